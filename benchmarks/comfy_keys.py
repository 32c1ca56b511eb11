"""Which of our single-file LoRA keys ComfyUI's own LoRA loader maps, per diffusion family.

    python -m benchmarks.comfy_keys --comfy-dir /path/to/ComfyUI [--families wan flux2 ...] [--examples 3]

ComfyUI is not a dependency: the script imports it from `--comfy-dir` (a checkout whose requirements are
importable by this Python: its torch, comfy-kitchen, comfy-aimdo, torchsde, scipy, ...). Nothing runs on
a GPU and no weights are read.

Our side, per family: the tiny build's transformer gets a rank-2 LoRA on every nn.Linear and on the
family's default targets, and `kohya.to_kohya` names it exactly as `personalize train` writes
`<output name>.safetensors`. ComfyUI's side is the path a LoRA file takes in its LoraLoader:
`comfy.lora_convert.convert_lora`, then `comfy.lora.load_lora` with the key map
`comfy.lora.model_lora_keys_unet` builds for the model. The model is the one ComfyUI's own detection
(`comfy.model_detection.model_config_from_unet`) picks for a fingerprint of the released checkpoint (the
few keys and shapes its detection reads, sized from our family's published config), built on the meta
device. A module counts as mapped when load_lora turns its keys into a patch for a weight the model has.

The table also counts the same modules under the two diffusers-path prefixes trainers write
(`lora_transformer_` OneTrainer/kohya, `lycoris_` SimpleTuner/LyCORIS), to show which style a family
reads. ComfyUI adds model classes over time: a family whose class the checkout lacks is reported, not guessed.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from personalize import adapters
from personalize.formats import kohya
from personalize.models.families import describe
from personalize.models.tiny import build_tiny

Shapes = dict[str, tuple[int, ...]]
RANK = 2
PREFIXES = ("lora_transformer", "lora_unet", "lycoris")
STYLES = "all Linear as lora_transformer_ | as lycoris_"


def _flux_like(config: Mapping[str, Any], extra: Callable[[int], Shapes]) -> Shapes:
    """Flux, Chroma and Flux.2 checkpoints (ComfyUI's names: double_blocks / single_blocks / img_in / txt_in)."""
    head = int(config["attention_head_dim"])
    hidden = int(config["num_attention_heads"]) * head
    keys = {f"double_blocks.{i}.img_attn.norm.key_norm.scale": (head,) for i in range(config["num_layers"])}
    keys |= {f"single_blocks.{i}.norm.key_norm.scale": (head,) for i in range(config["num_single_layers"])}
    keys |= {"img_in.weight": (hidden, config["in_channels"]), "txt_in.weight": (hidden, config["joint_attention_dim"])}
    if config.get("guidance_embeds"):
        keys["guidance_in.in_layer.weight"] = (hidden, 256)
    return keys | extra(hidden)


def flux_fingerprint(config: Mapping[str, Any]) -> Shapes:
    return _flux_like(config, lambda hidden: {"vector_in.in_layer.weight": (hidden, config["pooled_projection_dim"])})


def chroma_fingerprint(config: Mapping[str, Any]) -> Shapes:
    return _flux_like(config, lambda hidden: {"distilled_guidance_layer.norms.0.scale": (hidden,)})


def flux2_fingerprint(config: Mapping[str, Any]) -> Shapes:
    return _flux_like(config, lambda hidden: {"double_stream_modulation_img.lin.weight": (6 * hidden, hidden)})


def wan_fingerprint(config: Mapping[str, Any]) -> Shapes:
    dim = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    patch = tuple(config["patch_size"])
    keys: Shapes = {f"blocks.{i}.ffn.0.weight": (config["ffn_dim"], dim) for i in range(config["num_layers"])}
    return keys | {
        "head.modulation": (1, 2, dim),
        "head.head.weight": (config["out_channels"] * patch[0] * patch[1] * patch[2], dim),
        "patch_embedding.weight": (dim, config["in_channels"], *patch),
    }


def qwen_image_fingerprint(config: Mapping[str, Any]) -> Shapes:
    hidden = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    keys: Shapes = {
        f"transformer_blocks.{i}.img_mod.1.weight": (6 * hidden, hidden) for i in range(config["num_layers"])
    }
    return keys | {
        "txt_norm.weight": (config["joint_attention_dim"],),
        "img_in.weight": (hidden, config["in_channels"]),
    }


def qwen_image21_fingerprint(config: Mapping[str, Any]) -> Shapes:
    """Qwen-Image 2.1's checkpoint names (those of diffusers' QwenImage21Transformer2DModel, which ComfyUI keeps)."""
    hidden = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    layers = range(config["num_layers"])
    keys: Shapes = {f"transformer_blocks.{i}.img_mlp.gate_layer.weight": (3 * hidden, hidden) for i in layers}
    return keys | {
        "txt_in.text_norm.weight": (config["context_in_dim"],),
        "img_in.weight": (hidden, config["in_channels"]),
        "modulation.1.weight": (4 * hidden, hidden),
    }


def hidream_fingerprint(config: Mapping[str, Any]) -> Shapes:
    hidden = int(config["num_attention_heads"]) * int(config["attention_head_dim"])
    return {"caption_projection.0.linear.weight": (hidden, config["caption_channels"][0])}


def z_image_fingerprint(config: Mapping[str, Any]) -> Shapes:
    dim = int(config["dim"])
    keys: Shapes = {f"layers.{i}.ffn_norm1.weight": (dim,) for i in range(config["n_layers"])}
    return keys | {
        "cap_embedder.1.weight": (dim, config["cap_feat_dim"]),
        "noise_refiner.0.attention.k_norm.weight": (dim // int(config["n_heads"]),),
        "cap_pad_token": (1, dim),
    }


def krea2_fingerprint(config: Mapping[str, Any]) -> Shapes:
    head = int(config["attention_head_dim"])
    features = int(config["num_attention_heads"]) * head
    kv = int(config["num_key_value_heads"]) * head
    keys: Shapes = {}
    for i in range(config["num_layers"]):
        keys[f"blocks.{i}.attn.wq.weight"] = (features, features)
        keys[f"blocks.{i}.attn.wk.weight"] = (kv, features)
    return keys | {
        "first.weight": (features, config["in_channels"]),
        "txtfusion.projector.weight": (config["text_hidden_dim"], config["num_text_layers"]),
        "txtfusion.layerwise_blocks.0.prenorm.scale": (config["text_hidden_dim"],),
    }


@dataclass(frozen=True)
class Case:
    tiny: str
    comfy_class: str  # the comfy.model_base class ComfyUI should detect
    fingerprint: Callable[[Mapping[str, Any]], Shapes]


CASES: dict[str, Case] = {
    "flux": Case("tiny-flux", "Flux", flux_fingerprint),
    "chroma": Case("tiny-chroma", "Chroma", chroma_fingerprint),
    "flux2": Case("tiny-flux2", "Flux2", flux2_fingerprint),
    "flux2-klein": Case("tiny-flux2-klein", "Flux2", flux2_fingerprint),
    "krea2": Case("tiny-krea2", "Krea2", krea2_fingerprint),
    "wan": Case("tiny-wan", "WAN21", wan_fingerprint),
    "qwen-image": Case("tiny-qwen-image", "QwenImage", qwen_image_fingerprint),
    "qwen-image-edit": Case("tiny-qwen-image-edit", "QwenImage", qwen_image_fingerprint),
    "qwen-image-edit-plus": Case("tiny-qwen-image-edit-plus", "QwenImage", qwen_image_fingerprint),
    "qwen-image-21": Case("tiny-qwen-image21", "QwenImage21", qwen_image21_fingerprint),
    "hidream": Case("tiny-hidream", "HiDream", hidream_fingerprint),
    "z-image": Case("tiny-z-image", "Lumina2", z_image_fingerprint),
}


def import_comfy(comfy_dir: Path) -> Any:
    """ComfyUI's modules from a checkout, set to the CPU (only meta-device models are built)."""
    sys.path.insert(0, str(comfy_dir))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.lora
    import comfy.lora_convert
    import comfy.model_base
    import comfy.model_detection

    return comfy


def comfy_version(comfy_dir: Path) -> str:
    version = comfy_dir / "comfyui_version.py"
    if version.is_file():
        for line in version.read_text().splitlines():
            if line.startswith("__version__"):
                return line.split("=", 1)[1].strip().strip("\"'")
    return "unknown"


def comfy_model(comfy: Any, case: Case, config: Mapping[str, Any]) -> tuple[Any, dict[str, Any]]:
    """ComfyUI's model (meta device) for the released checkpoint's fingerprint, and its key map."""
    fingerprint = {key: torch.empty(shape, device="meta") for key, shape in case.fingerprint(config).items()}
    model_config = comfy.model_detection.model_config_from_unet(fingerprint, "")
    if model_config is None:
        raise LookupError("ComfyUI's detection does not recognize the checkpoint")
    model = model_config.get_model(fingerprint, "", device=torch.device("meta"))
    if type(model).__name__ != case.comfy_class:
        raise LookupError(f"ComfyUI detects {type(model).__name__}, not {case.comfy_class}")
    return model, comfy.lora.model_lora_keys_unet(model, {})


def our_lora(transformer: nn.Module, targets: Any) -> dict[str, torch.Tensor]:
    """A rank-2 LoRA on `targets` (canonical keys); the transformer is left as it was."""
    adapters.inject(transformer, "lora", targets=targets, name="probe", rank=RANK, alpha=RANK)
    try:
        return {k: v.clone() for k, v in adapters.state_dict(transformer, "probe").items()}
    finally:
        adapters.remove(transformer, "probe")


def mapped_modules(comfy: Any, model: Any, key_map: dict[str, Any], tensors: dict[str, torch.Tensor]) -> set[str]:
    """Module names (the key before its first '.') ComfyUI's loader turns into a patch of a weight the model has."""
    weights = set(model.state_dict())
    converted = comfy.lora_convert.convert_lora(dict(tensors))
    patches = comfy.lora.load_lora(converted, key_map, log_missing=False)
    out = set()
    for module in {key.partition(".")[0] for key in converted}:
        target = key_map.get(module)
        weight = target[0] if isinstance(target, tuple) else target
        if target is not None and target in patches and weight in weights:
            out.add(module)
    return out


def with_prefix(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Canonical transformer keys as `<prefix>_<diffusers path with _>.<param>` (+ alpha)."""
    out = {}
    for path, group in adapters.group_by_module(dict(sd)).items():
        name = f"{prefix}_{path.replace('.', '_')}"
        out.update({f"{name}.{param}": value for param, value in group.items()})
        out.setdefault(f"{name}.alpha", torch.tensor(float(RANK)))
    return out


@dataclass
class Row:
    family: str
    comfy_class: str
    prefixes: str  # what our file's modules start with, and how many of each
    ours: tuple[int, int]
    default: tuple[int, int]
    styles: dict[str, tuple[int, int]]
    missing: list[str]


def count(comfy: Any, model: Any, key_map: dict, tensors: dict[str, torch.Tensor]) -> tuple[tuple[int, int], list[str]]:
    modules = {key.partition(".")[0] for key in tensors}
    hit = mapped_modules(comfy, model, key_map, tensors)
    return (len(hit & modules), len(modules)), sorted(modules - hit)


def run_family(comfy: Any, family: str, case: Case) -> Row:
    described = describe(family)
    assert described is not None, family
    config = next(iter(described.published.values()))
    model, key_map = comfy_model(comfy, case, config)
    transformer = build_tiny(case.tiny).transformer
    linear = [path for path, module in transformer.named_modules() if isinstance(module, nn.Linear)]
    everything = our_lora(transformer, linear)
    default = our_lora(transformer, described.targets[described.default_targets])
    ours = kohya.to_kohya({"transformer": everything}, family)
    mapped, missing = count(comfy, model, key_map, ours)
    modules = {key.partition(".")[0] for key in ours}
    written = Counter(next(p for p in PREFIXES if module.startswith(p + "_")) for module in modules)
    default_count, _ = count(comfy, model, key_map, kohya.to_kohya({"transformer": default}, family))
    styles = {p: count(comfy, model, key_map, with_prefix(everything, p))[0] for p in ("lora_transformer", "lycoris")}
    prefixes = " + ".join(f"`{prefix}_` {n}" for prefix, n in written.most_common())
    return Row(family, type(model).__name__, prefixes, mapped, default_count, styles, missing)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfy-dir", type=Path, required=True, help="a ComfyUI checkout (the folder with comfy/)")
    parser.add_argument("--families", nargs="*", default=list(CASES), choices=list(CASES))
    parser.add_argument("--examples", type=int, default=3, help="unmapped module names shown per family")
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)
    comfy = import_comfy(args.comfy_dir.resolve())
    print(f"ComfyUI {comfy_version(args.comfy_dir)} at {args.comfy_dir}")
    print(f"| family | ComfyUI class | we write (modules) | ours, all Linear | ours, default targets | {STYLES} |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    notes = []
    for family in args.families:
        case = CASES[family]
        if not hasattr(comfy.model_base, case.comfy_class):
            print(f"| {family} | (no {case.comfy_class} in this checkout) | | | | | |")
            continue
        try:
            row = run_family(comfy, family, case)
        except LookupError as error:
            print(f"| {family} | ({error}) | | | | | |")
            continue
        cells = [f"{a}/{b}" for a, b in (row.ours, row.default, row.styles["lora_transformer"], row.styles["lycoris"])]
        print(f"| {family} | {row.comfy_class} | {row.prefixes} | " + " | ".join(cells) + " |")
        if row.missing:
            notes.append(f"{family}: not mapped: {', '.join(row.missing[: args.examples])}")
    print("\n".join(notes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
