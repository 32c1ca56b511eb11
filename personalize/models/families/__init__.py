"""Flow-matching DiT families, one description each (flux.py, sd3.py, qwen_image.py, wan.py, ...): see description.py.

Order matters where configs overlap: Flux configs also have `joint_attention_dim`, so Flux is asked before
SD3; HiDream, Chroma and Flux.2 configs also have Flux's keys, so they are asked before Flux.
Families sharing a transformer class (Flux.1 and Flux Kontext) are told apart by the pipeline class first.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from personalize.models.families.chroma import CHROMA
from personalize.models.families.description import FamilyDescription
from personalize.models.families.flux import FLUX
from personalize.models.families.flux2 import FLUX2
from personalize.models.families.flux2_klein import FLUX2_KLEIN
from personalize.models.families.flux_kontext import FLUX_KONTEXT
from personalize.models.families.hidream import HIDREAM
from personalize.models.families.krea2 import KREA2_FAMILY
from personalize.models.families.qwen_image import QWEN_IMAGE_FAMILY
from personalize.models.families.sd3 import SD3
from personalize.models.families.wan import WAN
from personalize.models.families.z_image import Z_IMAGE_FAMILY

FLOW_FAMILIES: dict[str, FamilyDescription] = {
    description.name: description
    for description in (
        *(HIDREAM, CHROMA, FLUX2, FLUX2_KLEIN, FLUX, SD3, FLUX_KONTEXT),
        *(QWEN_IMAGE_FAMILY, Z_IMAGE_FAMILY, KREA2_FAMILY, WAN),
    )
}


def describe(family: str) -> FamilyDescription | None:
    """The description of a family name ("flux"), or None for families without one (UNet models)."""
    return FLOW_FAMILIES.get(family)


def family_of_config(config: Mapping[str, Any]) -> FamilyDescription | None:
    """The family whose transformer config this is (read from the config keys, never from names)."""
    return next((description for description in FLOW_FAMILIES.values() if description.matches(config)), None)


def family_of_pipeline_class(name: str) -> FamilyDescription | None:
    """The family whose diffusers pipeline class is `name` ("FluxKontextPipeline")."""
    return next((d for d in FLOW_FAMILIES.values() if d.pipeline_class == name), None)


def family_of_module(module: Any) -> FamilyDescription | None:
    """The family of a pipeline (by its class, else its transformer's class) or of a transformer (by its class)."""
    by_pipeline = family_of_pipeline_class(type(module).__name__)
    if by_pipeline is not None:
        return by_pipeline
    module = getattr(module, "transformer", None) or module
    name = type(module).__name__
    return next((d for d in FLOW_FAMILIES.values() if d.transformer_class == name), None)


def family_of_folder(folder: Any) -> FamilyDescription | None:
    """The family a diffusers folder's model_index.json names by pipeline class (None: ask the config)."""
    import json
    from pathlib import Path

    index = Path(folder) / "model_index.json"
    if not index.is_file():
        return None
    try:
        return family_of_pipeline_class(str(json.loads(index.read_text()).get("_class_name", "")))
    except (OSError, ValueError):
        return None


def published_config(model: str) -> tuple[FamilyDescription, dict[str, Any]] | None:
    """(family, transformer config) of a released checkpoint known by hub id, without any download."""
    for description in FLOW_FAMILIES.values():
        if model in description.published:
            return description, dict(description.published[model])
    return None


def described_family(model: str, pipe: Any = None) -> FamilyDescription | None:
    """The family of what `--model` names (or of a loaded pipeline), without loading weights; None for a
    model that is not a described DiT (or a hub id whose config cannot be read here)."""
    if pipe is not None:
        return family_of_module(pipe)
    for description in FLOW_FAMILIES.values():
        if model in description.tiny_names:
            return description
    known = published_config(model)
    if known is not None:
        return known[0]
    from pathlib import Path

    if Path(model).expanduser().is_dir() and family_of_folder(Path(model).expanduser()) is not None:
        return family_of_folder(Path(model).expanduser())
    config = transformer_config(model)
    return family_of_config(config) if config is not None else None


def transformer_config(model: str) -> dict[str, Any] | None:
    """The transformer config of a published id, a diffusers folder, a single file or a hub id (no weights)."""
    import json
    from pathlib import Path

    known = published_config(model)
    if known is not None:
        return known[1]
    path = Path(model).expanduser()
    if path.is_dir():
        file = path / "transformer" / "config.json"
        return json.loads(file.read_text()) if file.is_file() else None
    if path.suffix == ".safetensors" and path.is_file():
        from personalize.models.load import single_file_family

        described = describe(single_file_family(path))
        return dict(next(iter(described.published.values()))) if described is not None else None
    from personalize.models.load import HUB_ID

    if not HUB_ID.match(model):
        return None
    from huggingface_hub import hf_hub_download

    for local_only in (True, False):  # the local cache first: no request for a model seen before
        try:
            return json.loads(
                Path(hf_hub_download(model, "transformer/config.json", local_files_only=local_only)).read_text()
            )
        except Exception:  # not cached / offline, unknown, gated or not a diffusers repository: the caller decides
            continue
    return None


__all__ = [
    "described_family",
    "FLOW_FAMILIES",
    "FamilyDescription",
    "describe",
    "family_of_config",
    "family_of_folder",
    "family_of_module",
    "family_of_pipeline_class",
    "published_config",
    "transformer_config",
]
