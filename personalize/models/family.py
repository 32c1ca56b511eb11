"""Which base-model family something is, read from its configuration (never from its name).

Families: `sd1`, `sd2`, `sdxl`, `sd3`, `flux` (diffusion) and `llm`, `vlm` (transformers).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from personalize.errors import UserError

DIFFUSION_FAMILIES = ("sd1", "sd2", "sdxl", "sd3", "flux")
LANGUAGE_FAMILIES = ("llm", "vlm")
FAMILIES = DIFFUSION_FAMILIES + LANGUAGE_FAMILIES


def family_from_denoiser_config(config: Mapping[str, Any]) -> str | None:
    """UNet / DiT config -> family; DiT families from their descriptions (personalize.models.families)."""
    from personalize.models.families import family_of_config

    described = family_of_config(config)
    if described is not None:
        return described.name
    if "cross_attention_dim" in config:
        if config.get("addition_embed_type") == "text_time":
            return "sdxl"
        # Every SD2.x UNet uses linear projections in its transformer blocks; no SD1.x UNet does.
        return "sd2" if config.get("use_linear_projection") else "sd1"
    return None


def family_from_transformers_config(config: Mapping[str, Any]) -> str | None:
    if "vision_config" in config and "text_config" in config:
        return "vlm"
    architectures = config.get("architectures") or []
    if any(name.endswith("ForCausalLM") for name in architectures) or "vocab_size" in config:
        return "llm"
    return None


def family_from_checkpoint_keys(keys: Iterable[str]) -> str | None:
    """Original (non-diffusers) single-file checkpoints: the key layout tells the family."""
    keys = set(keys)

    def has(prefix: str) -> bool:
        return any(key.startswith(prefix) for key in keys)

    if has("double_blocks.") or has("model.diffusion_model.double_blocks."):
        return "flux"
    if has("model.diffusion_model.joint_blocks."):
        return "sd3"
    if has("conditioner.embedders.1."):
        return "sdxl"
    if has("cond_stage_model.model."):
        return "sd2"
    if has("cond_stage_model.transformer.") or has("model.diffusion_model.input_blocks."):
        return "sd1"
    return None


def _config_dict(obj: Any) -> Mapping[str, Any] | None:
    config = getattr(obj, "config", None)
    if config is None:
        return None
    if isinstance(config, Mapping):
        return config
    if hasattr(config, "to_dict"):
        return config.to_dict()
    return None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise UserError(f"cannot read {path}: {error}; is the model folder complete?") from None


def _family_of_folder(folder: Path) -> str | None:
    from personalize.models.families import family_of_folder

    by_pipeline = family_of_folder(folder)  # families sharing a transformer (Flux, Flux Kontext)
    if by_pipeline is not None:
        return by_pipeline.name
    if (folder / "model_index.json").is_file():
        for component in ("transformer", "unet"):
            config_path = folder / component / "config.json"
            if config_path.is_file():
                return family_from_denoiser_config(_read_json(config_path))
        return None
    if (folder / "config.json").is_file():
        config = _read_json(folder / "config.json")
        if "_class_name" in config or "_diffusers_version" in config:
            return family_from_denoiser_config(config)
        return family_from_transformers_config(config)
    return None


def detect_family(obj: Any) -> str:
    """Family of a diffusers pipeline, a denoiser, a transformers model, a config dict or a folder."""
    family = None
    if isinstance(obj, (str, Path)):
        folder = Path(obj)
        if not folder.is_dir():
            raise UserError(f"cannot detect the model family of {obj}: not a folder")
        family = _family_of_folder(folder)
    elif isinstance(obj, Mapping):
        family = family_from_denoiser_config(obj) or family_from_transformers_config(obj)
    elif hasattr(obj, "components"):  # a DiffusionPipeline: its class first (Flux and Flux Kontext share one)
        from personalize.models.families import family_of_pipeline_class

        by_pipeline = family_of_pipeline_class(type(obj).__name__)
        family = by_pipeline.name if by_pipeline is not None else None
        denoiser = getattr(obj, "transformer", None) or getattr(obj, "unet", None)
        config = _config_dict(denoiser) if denoiser is not None else None
        family = family or (family_from_denoiser_config(config) if config else None)
    else:
        config = _config_dict(obj)
        if config is not None:
            family = family_from_denoiser_config(config) or family_from_transformers_config(config)
    if family is None:
        raise UserError(
            f"cannot tell which model family {type(obj).__name__ if not isinstance(obj, (str, Path)) else obj} "
            f"is; supported: {', '.join(FAMILIES)}"
        )
    return family


def native_resolution(pipe: Any) -> int:
    """The side a diffusion base was trained at: its denoiser's sample_size (else the pipeline's
    default_sample_size) times the VAE's downscale -- what its pipeline uses as default height/width."""
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    size = getattr(getattr(denoiser, "config", None), "sample_size", None) or getattr(pipe, "default_sample_size", None)
    if not size:
        raise UserError(f"cannot tell the native resolution of {type(pipe).__name__}; pass --resolution")
    size = size[0] if isinstance(size, (list, tuple)) else size
    return int(size) * int(getattr(pipe, "vae_scale_factor", 8))
