"""Load a base model from whatever the user passed: a tiny name, a folder, a file, or a hub id.

Every failure a user can fix (offline, unknown id, pickle file without opt-in, a file we cannot
read) is a UserError with one line that says what to pass instead.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from personalize.errors import UserError
from personalize.models.family import family_from_checkpoint_keys
from personalize.models.tiny import TINY_DIFFUSION, TINY_LANGUAGE, TINY_MODELS, build_tiny
from personalize.models.world import resolve_model

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
SINGLE_FILE_PIPELINES = {
    "sd1": "StableDiffusionPipeline",
    "sd2": "StableDiffusionPipeline",
    "sdxl": "StableDiffusionXLPipeline",
    "sd3": "StableDiffusion3Pipeline",
}


def _hub_error(model: str, error: Exception, tiny_hint: str) -> UserError:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return UserError(
        f"could not load '{model}' from the Hugging Face Hub ({reason[:160]}); offline or unknown id: "
        f"pass a local folder or file with --model PATH, or --model {tiny_hint} for the offline demo"
    )


def _check_not_pickle(path: Path, allow_pickle: bool) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES and not allow_pickle:
        raise UserError(
            f"{path} is a pickle file, which can run code when loaded; convert it to .safetensors, "
            "or pass --allow-pickle if you trust its source"
        )


def _hub_kind(model: str, tiny_hint: str) -> None:
    if not HUB_ID.match(model):
        raise UserError(
            f"'{model}' is not a file, a folder, a tiny model ({', '.join(TINY_MODELS)}) or a hub id "
            f"(owner/name); check the spelling, or try --model {tiny_hint}"
        )


def _checkpoint_keys(path: Path) -> list[str]:
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                return list(handle.keys())
        except Exception as error:  # safetensors raises several types for a bad header
            raise UserError(f"{path} is not a readable .safetensors file ({error})") from None
    import torch

    try:  # only reached after the user opted in to pickle files; still refuse code objects
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:
        raise UserError(f"{path} is not a readable checkpoint ({str(error).splitlines()[0][:160]})") from None
    return list(checkpoint.get("state_dict", checkpoint))


def single_file_family(path: Path) -> str:
    keys = _checkpoint_keys(path)
    family = family_from_checkpoint_keys(keys)
    if family is None:
        raise UserError(
            f"{path} does not look like a Stable Diffusion / SDXL / SD3 / Flux checkpoint "
            f"(first keys: {', '.join(sorted(keys)[:3])}); if it is an adapter, use `personalize inspect`"
        )
    return family


def _load_single_file(path: Path, allow_pickle: bool, config: str | None, **kwargs: Any) -> Any:
    import diffusers

    _check_not_pickle(path, allow_pickle)
    family = single_file_family(path)
    if family not in SINGLE_FILE_PIPELINES:
        raise UserError(
            f"{path} is a {family} checkpoint that holds only the transformer; "
            "pass a diffusers folder or hub id for the whole pipeline"
        )
    pipeline_class = getattr(diffusers, SINGLE_FILE_PIPELINES[family])
    try:
        return pipeline_class.from_single_file(str(path), config=config, **kwargs)
    except OSError as error:
        raise UserError(
            f"could not build a {family} pipeline from {path} ({str(error).splitlines()[0][:160]}); "
            "offline, the architecture config must come from a local diffusers folder: pass --model-config DIR"
        ) from None


def load_pipeline(
    model: str,
    *,
    torch_dtype: Any = None,
    allow_pickle: bool = False,
    single_file_config: str | None = None,
    **kwargs: Any,
) -> Any:
    """A stock diffusers pipeline from a tiny name, a diffusers folder, a single file or a hub id."""
    model = resolve_model(model)  # dreambench-mini: the pretrained world model's folder
    if model in TINY_DIFFUSION:
        pipe = build_tiny(model)
        pipe.register_to_config(_name_or_path=model)  # pipe.name_or_path says where it came from
        return pipe.to(dtype=torch_dtype) if torch_dtype not in (None, pipe.dtype) else pipe
    if model in TINY_LANGUAGE:
        raise UserError(f"{model} is a language model, not a diffusion pipeline; try --model tiny-sd15")
    from diffusers import DiffusionPipeline

    path = Path(model).expanduser()
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    if path.is_file():
        return _load_single_file(path, allow_pickle, single_file_config, **kwargs)
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise UserError(
                f"{path} is not a diffusers pipeline folder (no model_index.json); "
                "pass a folder written by save_pretrained, a .safetensors checkpoint, or a hub id"
            )
        try:
            return _from_pretrained(DiffusionPipeline, str(path), **kwargs)
        except (OSError, ValueError) as error:
            raise UserError(f"could not load the pipeline in {path}: {str(error).splitlines()[0][:200]}") from None
    if path.suffix.lower() in (".safetensors", *PICKLE_SUFFIXES) or model.startswith((".", "/", "~")):
        raise UserError(f"{model} does not exist; check the path")
    _hub_kind(model, "tiny-sd15")
    try:
        return _from_pretrained(DiffusionPipeline, model, **kwargs)
    except Exception as error:
        if _is_hub_failure(error):
            raise _hub_error(model, error, "tiny-sd15") from None
        raise


def _from_pretrained(cls: Any, source: str, **kwargs: Any) -> Any:
    """cls.from_pretrained without computing the position tables the weights hold (SD3: position_tables.py)."""
    from personalize.models.position_tables import lazy_position_tables

    with lazy_position_tables() as tables:
        pipe = cls.from_pretrained(source, **{**_family_components(source, kwargs), **kwargs})
    tables.fill_missing(pipe)
    return pipe


HUB_OPTIONS = ("revision", "cache_dir", "local_files_only", "token")


def _family_components(source: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """Components a described family builds itself for this folder / released id (Qwen-Image-Edit's processor
    where torchvision is missing), else none."""
    from personalize.models.families import family_of_folder, published_config

    path = Path(source).expanduser()
    family = family_of_folder(path) if path.is_dir() else (published_config(source) or (None, None))[0]
    if family is None or family.load_components is None:
        return {}
    return family.load_components(source, **{key: kwargs[key] for key in HUB_OPTIONS if key in kwargs})


def load_language_model(model: str, *, torch_dtype: Any = None, **kwargs: Any) -> tuple[Any, Any]:
    """`(model, tokenizer)` for a causal LM, `(model, processor)` for a VLM."""
    if model in TINY_LANGUAGE:
        built_model, processor = build_tiny(model)
        if torch_dtype not in (None, built_model.dtype):
            built_model = built_model.to(dtype=torch_dtype)
        return built_model, processor
    if model in TINY_DIFFUSION:
        raise UserError(f"{model} is a diffusion pipeline, not a language model; try --model tiny-llama")
    from transformers import AutoConfig

    path = Path(model).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} is a file; a language model is a folder with config.json (or a hub id)")
    if not path.exists():
        if model.startswith((".", "/", "~")):
            raise UserError(f"{model} does not exist; check the path")
        _hub_kind(model, "tiny-llama")
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    try:
        config = AutoConfig.from_pretrained(model)
    except Exception as error:
        if path.is_dir() or not _is_hub_failure(error):
            raise UserError(f"could not read the model config of {model}: {str(error).splitlines()[0][:200]}") from None
        raise _hub_error(model, error, "tiny-llama") from None
    if hasattr(config, "vision_config"):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        return AutoModelForImageTextToText.from_pretrained(model, **kwargs), AutoProcessor.from_pretrained(model)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(model, **kwargs), AutoTokenizer.from_pretrained(model)


def _is_hub_failure(error: Exception) -> bool:
    """Offline, unknown repository, no access: what a user fixes by passing a local path."""
    try:
        from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled
    except ImportError:  # older huggingface_hub
        return isinstance(error, OSError)
    hub_errors = (HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled, OSError, ConnectionError)
    return isinstance(error, hub_errors)
