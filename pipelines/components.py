"""Which parts of a diffusers pipeline adapters and embeddings go into.

An adapter file is routed by component: the denoiser (`unet` for SD1.x/SD2/SDXL, `transformer` for
SD3/Flux) and the text encoders (`text_encoder`, `text_encoder_2`, `text_encoder_3`); each text encoder
has its tokenizer under the matching name (`tokenizer`, `tokenizer_2`, `tokenizer_3`).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from personalize.errors import UserError

DENOISERS = ("unet", "transformer")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")
ADAPTER_COMPONENTS = DENOISERS + TEXT_ENCODERS


def tokenizer_name(text_encoder: str) -> str:
    """ "text_encoder_2" -> "tokenizer_2"."""
    return text_encoder.replace("text_encoder", "tokenizer", 1)


def pipeline_components(pipe: Any) -> dict[str, nn.Module]:
    """The adapter-carrying modules this pipeline has: {"unet": UNet2DConditionModel, ...}."""
    found = {}
    for name in ADAPTER_COMPONENTS:
        module = getattr(pipe, name, None)
        if isinstance(module, nn.Module):
            found[name] = module
    return found


def denoiser(pipe: Any) -> nn.Module:
    """The UNet or the transformer of a pipeline."""
    for name in DENOISERS:
        module = getattr(pipe, name, None)
        if isinstance(module, nn.Module):
            return module
    raise UserError(f"{type(pipe).__name__} has neither a unet nor a transformer; is it a diffusion pipeline?")


def require_components(pipe: Any, wanted: list[str]) -> dict[str, nn.Module]:
    """The modules named in `wanted`; a name this pipeline lacks is an error that points at the family."""
    present = pipeline_components(pipe)
    missing = [name for name in wanted if name not in present]
    if missing:
        raise UserError(
            f"the adapter has weights for {', '.join(missing)}, which this {type(pipe).__name__} does not have "
            f"(it has {', '.join(present) or 'none'}); is the adapter for another model family?"
        )
    return {name: present[name] for name in wanted}
