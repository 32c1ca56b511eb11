"""Facts about canonical adapter state dicts that every converter needs.

A canonical state dict maps "<module path>.<param>" to a tensor, with the kohya/LyCORIS parameter names
(`lora_down.weight`, `lora_up.weight`, `alpha`, `dora_scale`, `hada_*`, `lokr_*`, IA3 `weight`/`on_input`).
`alpha` is the EFFECTIVE alpha: the scale every reader applies is alpha / r (LoKr with two full factors: 1).
A *component dict* maps a pipeline component ("unet", "text_encoder", "text_encoder_2", "transformer",
"model") to its canonical state dict.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from personalize.errors import UserError

Components = dict[str, dict[str, torch.Tensor]]

LORA_METHODS = ("lora", "locon", "dora")
LYCORIS_METHODS = ("loha", "lokr", "krona", "ia3", "oft", "boft")


def method_of(group: Mapping[str, torch.Tensor]) -> str:
    """The method of one module's parameters: lora, dora, loha, lokr, oft, boft, vera or ia3."""
    if "lora_down.weight" in group:
        return "dora" if "dora_scale" in group else "lora"
    if "hada_w1_a" in group:
        return "loha"
    if any(key.startswith("lokr_") for key in group):
        return "lokr"
    if "vera_lambda_b" in group:
        return "vera"
    if "difffit_gamma" in group:
        return "difffit"
    if "oft_blocks" in group:
        return "oft" if group["oft_blocks"].dim() == 3 else "boft"
    if "weight" in group:
        return "ia3"
    raise UserError(f"cannot tell the adapter method from the parameters {sorted(group)}")


def rank_of(group: Mapping[str, torch.Tensor]) -> int | None:
    """The r in s = alpha / r; None for IA3 and for LoKr with two full factors (s = 1)."""
    if "lora_down.weight" in group:
        return int(group["lora_down.weight"].shape[0])
    if "hada_w1_b" in group:
        return int(group["hada_w1_b"].shape[0])
    for key in ("lokr_w2_a", "lokr_w1_a"):
        if key in group:
            return int(group[key].shape[1])
    return None


def alpha_of(group: Mapping[str, torch.Tensor]) -> float | None:
    """The effective alpha (r when the file has none, i.e. scale 1); None where no scale applies."""
    rank = rank_of(group)
    if rank is None:
        return None
    return float(group["alpha"]) if "alpha" in group else float(rank)


def parameter_count(components: Components) -> int:
    return sum(value.numel() for sd in components.values() for key, value in sd.items() if not _is_buffer(key))


def _is_buffer(key: str) -> bool:
    return key.endswith(".alpha") or key.endswith(".on_input")
