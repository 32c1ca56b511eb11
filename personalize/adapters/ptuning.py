"""P-tuning (Liu et al., "GPT Understands, Too", arXiv 2103.10385): virtual tokens made by a prompt encoder.

    P = f(E),   E (n, D) trainable embeddings ("embedding"),   [P; E(x)] is what the model reads

f is peft's prompt encoder: an MLP D -> h -> h -> D with ReLUs (`encoder: mlp`), or a bidirectional
LSTM (h per direction, `encoder_num_layers` layers) followed by an MLP 2h -> 2h -> D (`encoder: lstm`);
h = `encoder_hidden_size` (default D). E starts from the embeddings of n random vocabulary tokens.
Prepending, labels and the attention mask work as prompt tuning's. What is saved is P itself (peft's
P_TUNING layout in inference mode): the encoder only exists to train it. A loaded P keeps the encoder
aside and is used as is.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from personalize.errors import UserError

ENCODERS = ("mlp", "lstm")
STATE_KEY = "prompt_embeddings"


class PTuning(nn.Module):
    method: ClassVar[str] = "p-tuning"

    def __init__(
        self,
        model: nn.Module,
        num_virtual_tokens: int = 20,
        encoder: str = "mlp",
        encoder_hidden_size: int | None = None,
        encoder_num_layers: int = 2,
        encoder_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if num_virtual_tokens < 1:
            raise UserError(f"p-tuning: num_virtual_tokens must be at least 1 (got {num_virtual_tokens})")
        if encoder not in ENCODERS:
            raise UserError(f"p-tuning: encoder must be one of {', '.join(ENCODERS)} (got '{encoder}')")
        words = model.get_input_embeddings().weight
        dim = words.shape[1]
        hidden = encoder_hidden_size or dim
        ids = torch.randint(0, words.shape[0], (num_virtual_tokens,), device=words.device)
        self.num_virtual_tokens = num_virtual_tokens
        self.encoder = encoder
        self.embedding = nn.Embedding(num_virtual_tokens, dim, device=words.device)
        with torch.no_grad():
            self.embedding.weight.copy_(words[ids].float())  # (n, D)
        if encoder == "lstm":
            self.lstm_head = nn.LSTM(
                dim,
                hidden,
                num_layers=encoder_num_layers,
                dropout=encoder_dropout,
                bidirectional=True,
                batch_first=True,
            )
            layers = [nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, dim)]
        else:
            layers = [nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, dim)]
        self.mlp_head = nn.Sequential(*layers).to(words.device)
        if encoder == "lstm":
            self.lstm_head.to(words.device)
        self.register_buffer("loaded", None)

    @property
    def prompt_embeddings(self) -> torch.Tensor:
        """P (n, D): the encoder's output, or the loaded prompt."""
        if self.loaded is not None:
            return self.loaded
        embeds = self.embedding.weight.unsqueeze(0)  # (1, n, D)
        if self.encoder == "lstm":
            embeds = self.lstm_head(embeds)[0]  # (1, n, 2h)
        return self.mlp_head(embeds)[0]  # (n, D)

    def hook(self, model: nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
        from personalize.adapters.prompt import PromptTuning

        return PromptTuning.hook(self, model, kwargs)  # type: ignore[arg-type]

    def tensors(self) -> dict[str, torch.Tensor]:
        return {STATE_KEY: self.prompt_embeddings.detach()}

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.loaded = tensors[STATE_KEY].detach().clone().to(self.embedding.weight.device)
