"""Few-shot classifiers on a frozen CLIP / ViT: each maps images (or cached image features) to class logits.

- zero-shot CLIP (Radford et al. 2021): logits = s * cos(f, t_c), t_c = text("a photo of a {class}.")
- CoOp (Zhou et al., arXiv 2109.01134): the prompt's words become n learned context vectors shared by the
  classes, t_c = text([v_1 ... v_n, CLASS, "."]); only the v_i train (through the frozen text encoder).
- CLIP-Adapter (Gao et al., arXiv 2110.04544): f' = a * MLP(f) + (1 - a) f, a = 0.2, MLP d -> d/4 -> d.
- Tip-Adapter (Zhang et al., arXiv 2207.09930): a key-value cache of the N few-shot features F (N, d) and
  one-hot labels L (N, C): logits = s cos(f, T) + alpha * exp(-beta (1 - f F^T)) L, alpha = 1, beta = 5.5;
  training-free. Tip-Adapter-F trains the keys F.
- VPT (Jia et al., arXiv 2203.12119): p learned prompt tokens after the CLS token of the image encoder's
  input (shallow), or fresh ones at every layer's input (deep).
- `linear`: a linear head on the frozen features (linear probe); the injection core's methods (LoRA,
  BitFit, OFT, Houlsby / Pfeiffer bottleneck adapters, ...) adapt the image encoder's own layers under a head.
- NOAH (Zhang et al., arXiv 2206.04673): per block, the sizes of an Adapter, a LoRA and VPT prompts found by a
  one-shot search over a weight-sharing supernet (trainers/vision/noah.py).
A CLIP backbone classifies with its text encoder's class embeddings (the zero-shot head) wherever the
method does not bring its own; a ViT with a trained linear head on its CLS state.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from personalize import adapters
from personalize.errors import UserError
from personalize.trainers.vision.backbone import Backbone
from personalize.trainers.vision.config import CLIP_METHODS, CORE_METHODS, PROMPT_METHODS

ADAPTER_NAME = "classify"
CORE_TARGETS = r".*\.(q_proj|k_proj|v_proj|out_proj|o_proj|fc1|fc2|query|key|value)"
# bottleneck adapters after a block's sublayer outputs (ViT: attention.o_proj, CLIP: self_attn.out_proj; mlp.fc2)
BOTTLENECK_TARGETS = {
    "houlsby": r"(.*\.)?layers\.\d+\.(attention\.o_proj|self_attn\.out_proj|mlp\.fc2)",
    "pfeiffer": r"(.*\.)?layers\.\d+\.mlp\.fc2",
}


def class_prompt_ids(backbone: Backbone, classes: list[str], template: str) -> torch.Tensor:
    tokens = backbone.tokenizer([template.format(c.replace("_", " ")) for c in classes], padding=True)
    return torch.tensor(tokens["input_ids"])  # (C, L)


class TextHead(nn.Module):
    """Zero-shot CLIP: fixed class embeddings from the prompt template."""

    def __init__(self, backbone: Backbone, classes: list[str], template: str) -> None:
        super().__init__()
        with torch.no_grad():
            text = backbone.text_features(class_prompt_ids(backbone, classes, template))
        self.register_buffer("text", F.normalize(text, dim=-1), persistent=False)  # (C, d)
        self.scale = backbone.logit_scale()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(features, dim=-1) @ self.text.T  # (B, C)


class CoOpHead(nn.Module):
    """Learned context vectors in place of the prompt's words, read by the frozen text encoder."""

    def __init__(self, backbone: Backbone, classes: list[str], n_ctx: int = 4) -> None:
        super().__init__()
        tokenizer = backbone.tokenizer
        names = [tokenizer(c.replace("_", " ") + ".", add_special_tokens=False)["input_ids"] for c in classes]
        length = 1 + n_ctx + max(len(n) for n in names) + 1
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        # placeholders the context vectors replace: a plain word, never EOS (CLIP pools at the first EOS)
        (placeholder,) = tokenizer("X", add_special_tokens=False)["input_ids"][:1]
        rows = [[tokenizer.bos_token_id] + [placeholder] * n_ctx + n + [tokenizer.eos_token_id] for n in names]
        self.register_buffer("ids", torch.tensor([r + [pad] * (length - len(r)) for r in rows]), persistent=False)
        width = backbone.model.text_model.embeddings.token_embedding.embedding_dim
        generator = torch.Generator().manual_seed(0)
        self.ctx = nn.Parameter(torch.randn(n_ctx, width, generator=generator) * 0.02)  # CoOp's N(0, 0.02^2)
        self.backbone = [backbone]  # not a submodule: its weights are not ours to save
        self.scale = backbone.logit_scale()
        embedding = backbone.model.text_model.embeddings.token_embedding
        self._hook = embedding.register_forward_hook(self._insert_context)
        self._active = False

    def _insert_context(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor | None:
        if not self._active:
            return None
        n = self.ctx.shape[0]
        ctx = self.ctx.to(output.dtype).unsqueeze(0).expand(output.shape[0], -1, -1)
        return torch.cat([output[:, :1], ctx, output[:, 1 + n :]], dim=1)  # (C, L, D)

    def class_embeddings(self) -> torch.Tensor:
        self._active = True
        try:
            return F.normalize(self.backbone[0].text_features(self.ids), dim=-1)  # (C, d)
        finally:
            self._active = False

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(features, dim=-1) @ self.class_embeddings().T


class ClipAdapterHead(nn.Module):
    def __init__(self, text_head: TextHead, dim: int, reduction: int = 4, ratio: float = 0.2) -> None:
        super().__init__()
        self.text_head = text_head
        self.adapter = nn.Sequential(
            nn.Linear(dim, dim // reduction, bias=False),
            nn.ReLU(),
            nn.Linear(dim // reduction, dim, bias=False),
            nn.ReLU(),
        )
        self.ratio = ratio

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        adapted = self.ratio * self.adapter(features) + (1 - self.ratio) * features
        return self.text_head(adapted)


class TipAdapterHead(nn.Module):
    def __init__(
        self,
        text_head: TextHead,
        keys: torch.Tensor,
        labels: torch.Tensor,
        classes: int,
        train_keys: bool = False,
        alpha: float = 1.0,
        beta: float = 5.5,
    ) -> None:
        super().__init__()
        self.text_head = text_head
        keys = F.normalize(keys.detach().float(), dim=-1)  # (N, d)
        self.keys = nn.Parameter(keys, requires_grad=train_keys)
        self.register_buffer("values", F.one_hot(labels.long(), classes).float())  # (N, C)
        self.alpha, self.beta = alpha, beta

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        f = F.normalize(features, dim=-1)
        affinity = f @ F.normalize(self.keys, dim=-1).T  # (B, N) cosine
        cache = torch.exp(-self.beta * (1 - affinity)) @ self.values  # (B, C)
        return self.text_head(features) + self.alpha * cache


class VisualPrompts(nn.Module):
    """VPT: p prompt tokens inserted after CLS into the image encoder (every layer's input when deep)."""

    def __init__(self, backbone: Backbone, tokens: int = 8, deep: bool = False) -> None:
        super().__init__()
        layers = backbone.layers()
        width = backbone.vision.config.hidden_size
        generator = torch.Generator().manual_seed(0)
        count = len(layers) if deep else 1
        self.prompts = nn.Parameter(torch.randn(count, tokens, width, generator=generator) * 0.02)  # (L|1, p, D)
        self._hooks = [backbone.vision.embeddings.register_forward_hook(self._insert)]
        for index, layer in enumerate(layers):
            if deep and index > 0:
                self._hooks.append(layer.register_forward_pre_hook(self._replacer(index), with_kwargs=True))

    def _insert(self, module: nn.Module, inputs: Any, output: torch.Tensor) -> torch.Tensor:
        prompts = self.prompts[0].to(output.dtype).unsqueeze(0).expand(output.shape[0], -1, -1)
        return torch.cat([output[:, :1], prompts, output[:, 1:]], dim=1)  # (B, 1 + p + P, D)

    def _replacer(self, index: int):
        def replace(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            hidden = args[0] if args else kwargs["hidden_states"]
            p = self.prompts.shape[1]
            prompts = self.prompts[index].to(hidden.dtype).unsqueeze(0).expand(hidden.shape[0], -1, -1)
            hidden = torch.cat([hidden[:, :1], prompts, hidden[:, 1 + p :]], dim=1)
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}

        return replace


class Classifier(nn.Module):
    """The backbone (frozen, not saved) + what the method adds; `uses_features`: the image encoder is
    untouched, so its features can be computed once and the head trains on them."""

    def __init__(self, backbone: Backbone, method: str, head: nn.Module, extra: nn.Module | None = None) -> None:
        super().__init__()
        self.backbone = [backbone]
        self.method = method
        self.head = head
        self.extra = extra if extra is not None else nn.Identity()
        self.uses_features = method in CLIP_METHODS or method == "linear"
        self.saved_options: dict[str, Any] = {}  # what a reload needs beyond the run's method_options (NOAH)

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.backbone[0].image_features(pixels)

    def forward(self, pixels: torch.Tensor | None = None, features: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.features(pixels) if features is None else features)

    def trained_state(self) -> dict[str, torch.Tensor]:
        """What a reload needs: the method's parameters and buffers, plus the core adapter's state."""
        state = {f"{k}": v.detach().cpu() for k, v in self.state_dict().items()}
        if self.method in CORE_METHODS:
            core = adapters.state_dict(self.backbone[0].vision, ADAPTER_NAME)
            state.update({f"vision.{k}": v.detach().cpu() for k, v in core.items()})
        return state

    def load_trained_state(self, state: dict[str, torch.Tensor]) -> None:
        own = {k: v for k, v in state.items() if not k.startswith("vision.")}
        self.load_state_dict(own, strict=True)
        if self.method in CORE_METHODS:
            core = {k.removeprefix("vision."): v for k, v in state.items() if k.startswith("vision.")}
            adapters.load_state_dict(self.backbone[0].vision, core, ADAPTER_NAME)


def feature_dim(backbone: Backbone) -> int:
    if backbone.kind == "clip":
        return backbone.model.config.projection_dim
    return backbone.model.config.hidden_size


def head_for(backbone: Backbone, classes: list[str], template: str, method: str = "") -> nn.Module:
    """CLIP: the zero-shot text head (except for `linear`); a ViT: a zero-initialized linear head."""
    if backbone.kind == "clip" and method != "linear":
        return TextHead(backbone, classes, template)
    head = nn.Linear(feature_dim(backbone), len(classes))
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return head


def _noah(backbone: Backbone, head: nn.Module, options: dict[str, Any]) -> Classifier:
    from personalize.trainers.vision import noah

    chosen = options.get("config")
    blocks = len(backbone.layers())
    keys = {"lora", "adapter", "vpt"}

    def valid(block: Any) -> bool:
        return (
            isinstance(block, dict)
            and set(block) == keys
            and all(isinstance(v, int) and v >= 0 for v in block.values())
        )

    if not isinstance(chosen, list) or len(chosen) != blocks or not all(valid(block) for block in chosen):
        raise UserError(
            f"noah: method_options.config must list {blocks} blocks of {{lora, adapter, vpt}} sizes >= 0 "
            f"(got {str(chosen)[:80]})"
        )
    sizes = {key: [block[key] for block in chosen] for key in ("lora", "adapter", "vpt")}
    subnet = noah.Noah(backbone, sizes["lora"], sizes["adapter"], sizes["vpt"])
    classifier = Classifier(backbone, "noah", head, subnet)
    classifier.saved_options = {"config": chosen}
    return classifier


def build_classifier(
    backbone: Backbone,
    method: str,
    classes: list[str],
    template: str,
    options: dict[str, Any],
    cache: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> Classifier:
    """The classifier of `method`; Tip-Adapter takes its cache (features, labels) from `cache`."""
    if method in CLIP_METHODS and backbone.kind != "clip":
        raise UserError(
            f"--method {method} needs a CLIP model (its text encoder names the classes); "
            "use vpt-shallow, vpt-deep, linear or a core method (lora, bitfit, ...) on a ViT"
        )
    options = dict(options)
    text_head = head_for(backbone, classes, template, method)
    if method == "noah":  # the chosen configuration (the search itself: trainers/vision/noah_train.py)
        return _noah(backbone, text_head, options)
    if method == "zero-shot":
        return Classifier(backbone, method, text_head)
    if method == "coop":
        return Classifier(backbone, method, CoOpHead(backbone, classes, n_ctx=int(options.pop("n_ctx", 4))))
    if method == "clip-adapter":
        return Classifier(backbone, method, ClipAdapterHead(text_head, feature_dim(backbone), **options))
    if method in ("tip-adapter", "tip-adapter-f"):
        if cache is None:
            raise UserError("tip-adapter needs the few-shot images for its cache")
        keys, labels = cache
        head = TipAdapterHead(text_head, keys, labels, len(classes), train_keys=method == "tip-adapter-f", **options)
        return Classifier(backbone, method, head)
    if method == "linear":
        return Classifier(backbone, method, text_head)
    if method in PROMPT_METHODS:
        prompts = VisualPrompts(backbone, tokens=int(options.pop("tokens", 8)), deep=method == "vpt-deep")
        return Classifier(backbone, method, text_head, prompts)
    if method in CORE_METHODS:
        default = BOTTLENECK_TARGETS.get(method, None if method in ("bitfit", "norm", "difffit") else CORE_TARGETS)
        targets = options.pop("targets", default)
        adapters.inject(backbone.vision, method, targets=targets, name=ADAPTER_NAME, **options)
        return Classifier(backbone, method, text_head)
    raise UserError(f"unknown classification method '{method}'")
