"""Flow-matching DiT families, one description each (flux.py, sd3.py, qwen_image.py, wan.py, ...): see description.py.

Order matters where configs overlap: Flux configs also have `joint_attention_dim`, so Flux is asked before
SD3; HiDream, Chroma and Flux.2 configs also have Flux's keys, so they are asked before Flux.
Families sharing a transformer class (Flux.1 and Flux Kontext, Qwen-Image and Qwen-Image-Edit) are told apart
by the pipeline class first.
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
from personalize.models.families.qwen_image21 import QWEN_IMAGE_21_FAMILY
from personalize.models.families.qwen_image_edit import QWEN_IMAGE_EDIT, QWEN_IMAGE_EDIT_PLUS
from personalize.models.families.sd3 import SD3
from personalize.models.families.wan import WAN
from personalize.models.families.z_image import Z_IMAGE_FAMILY

FLOW_FAMILIES: dict[str, FamilyDescription] = {
    description.name: description
    for description in (
        *(HIDREAM, CHROMA, FLUX2, FLUX2_KLEIN, FLUX, SD3, FLUX_KONTEXT),
        *(
            QWEN_IMAGE_21_FAMILY,
            QWEN_IMAGE_FAMILY,
            QWEN_IMAGE_EDIT,
            QWEN_IMAGE_EDIT_PLUS,
            Z_IMAGE_FAMILY,
            KREA2_FAMILY,
            WAN,
        ),
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


def check_described(model: str) -> None:
    """A DiT pipeline diffusers ships that no family file describes (a folder or a cached hub id whose
    model_index.json names a pipeline with a transformer): one line naming it and the nearest described
    family: the one whose published transformer config shares the most config keys with this one, each key
    weighted by 1 / (how many families have it), over sqrt(|keys of both|) (Lumina 2 -> Z-Image, Chroma ->
    Flux, CogView4 -> SD3)."""
    from personalize.errors import UserError

    index = _model_index(model)
    config = transformer_config(model) if index is not None and "transformer" in index else None
    if config is None or family_of_config(config) is not None:
        return
    pipeline = str(index.get("_class_name", "a diffusers pipeline"))  # type: ignore[union-attr]
    keys = {key for key in config if not key.startswith("_")}
    published = {
        name: {key for key in next(iter(d.published.values())) if not key.startswith("_")}
        for name, d in FLOW_FAMILIES.items()
    }
    holders = {key: sum(key in family_keys for family_keys in published.values()) for key in keys}

    def overlap(description: FamilyDescription) -> float:
        shared = keys & published[description.name]
        return sum(1 / holders[key] for key in shared) / len(keys | published[description.name]) ** 0.5

    nearest = max(FLOW_FAMILIES.values(), key=overlap)
    name = pipeline.removesuffix("Pipeline") or pipeline
    raise UserError(
        f"{model} is a {name} model ({pipeline}, transformer {config.get('_class_name', '?')}), a family "
        f"personalize does not describe yet; the nearest supported family is {nearest.name} "
        f"({nearest.pipeline_class}); supported: {', '.join(FLOW_FAMILIES)}"
    )


def _model_index(model: str) -> dict[str, Any] | None:
    """model_index.json of a diffusers folder or of a hub id already in the local cache (no request)."""
    import json
    from pathlib import Path

    path = Path(model).expanduser()
    if path.is_dir():
        file = path / "model_index.json"
        return json.loads(file.read_text()) if file.is_file() else None
    from personalize.models.load import HUB_ID

    if not HUB_ID.match(model):
        return None
    from huggingface_hub import hf_hub_download

    try:
        return json.loads(Path(hf_hub_download(model, "model_index.json", local_files_only=True)).read_text())
    except Exception:  # not cached: the loader says what is wrong when it tries
        return None


__all__ = [
    "check_described",
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
