"""`personalize convert` and `personalize inspect`: adapters between layouts, and what a file holds."""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from personalize.errors import UserError

# "lora": short for lora-svd; "lycoris": kohya keys with every LoKr/KronA module in a layout LyCORIS's own
# loader rebuilds (formats/lycoris_compat.py: exact, no approximation).
TARGET_LAYOUTS = ("diffusers", "kohya", "lycoris", "peft", "lora-svd", "lora")


def register_convert(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="convert an adapter between diffusers, kohya/LyCORIS and peft layouts",
        description="Read an adapter in any supported layout and write it in another. LoHa/LoKr/KronA/IA3 have "
        "no diffusers layout: --to lora-svd approximates them (or DoRA) by a LoRA of --rank R and reports the error. "
        "--to lycoris rewrites LoKr/KronA factors that LyCORIS's loader cannot rebuild (e.g. KronA a1=64, a2=8) "
        "into an exactly equal layout it can.",
    )
    parser.add_argument("input", help="adapter file or folder (diffusers, kohya/LyCORIS, peft, embeddings)")
    parser.add_argument("output", help="a folder, or a .safetensors file for --to diffusers/kohya")
    parser.add_argument("--to", required=True, choices=TARGET_LAYOUTS, dest="to")
    parser.add_argument("--rank", type=int, default=None, help="LoRA rank for --to lora-svd (default 16)")
    parser.add_argument(
        "--model",
        "--base",
        default=None,
        help="base model (tiny name, folder or hub id): checks the names; needed for --to lora-svd "
        "(for a --method full run folder, default: the base named in its config.yaml)",
    )
    parser.add_argument("--family", default=None, help="sd1, sd2, sdxl, sd3, flux, llm, vlm (default: guessed)")
    parser.add_argument("--allow-pickle", action="store_true", help="read .pt/.bin/.ckpt (weights_only=True)")
    parser.set_defaults(run=run_convert)


def register_inspect(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "inspect",
        help="show what an adapter file or folder holds",
        description="Detected layout, method per module, rank/alpha, targets, parameter count, file size, "
        "base family guess and metadata, as a table.",
    )
    parser.add_argument("path", help="adapter file or folder")
    parser.add_argument("--modules", action="store_true", help="list every module, not only the summary")
    parser.add_argument("--allow-pickle", action="store_true", help="read .pt/.bin/.ckpt (weights_only=True)")
    parser.set_defaults(run=run_inspect)


def load_model(name: str) -> Any:
    """A diffusion pipeline, or a language model, for a tiny name, a folder or a hub id."""
    from personalize.models import TINY_LANGUAGE, build_tiny, detect_family, load_language_model, load_pipeline

    if name in TINY_LANGUAGE:
        return build_tiny(name)[0]
    if Path(name).is_dir() and detect_family(name) in ("llm", "vlm"):
        return load_language_model(name)[0]
    return load_pipeline(name)


def guess_family(found: Any) -> str:
    """Base family from our metadata, kohya's ss_* metadata, or the names and widths in the file."""
    metadata = found.metadata
    if metadata.get("personalize_family"):
        return metadata["personalize_family"]
    version = metadata.get("ss_base_model_version", "")
    for prefix, family in (("sdxl", "sdxl"), ("sd_v2", "sd2"), ("sd_v1", "sd1"), ("sd3", "sd3"), ("flux", "flux")):
        if version.startswith(prefix):
            return family
    if metadata.get("ss_v2") == "True":
        return "sd2"
    components = set(found.components) | {c for parts in found.embeddings.values() for c in parts}
    if "model" in components:
        return "llm"
    if "transformer" in components:
        return "flux" if "text_encoder_2" in components else "sd3"
    if "text_encoder_2" in components:
        return "sdxl"
    widths = [v.shape[-1] for k, v in found.components.get("text_encoder", {}).items() if "lora_down" in k]
    widths += [parts["text_encoder"].shape[-1] for parts in found.embeddings.values() if "text_encoder" in parts]
    return "sd2" if widths and widths[0] == 1024 else "sd1"


def _unet_config(model: Any) -> Any:
    unet = getattr(model, "unet", None)
    return dict(unet.config) if unet is not None and hasattr(unet, "config") else None


def run_convert(args: argparse.Namespace) -> int:
    from personalize.formats import diffusers, kohya, peft
    from personalize.formats.io import _write_all, embeddings_files, model_components, read_adapter
    from personalize.formats.lycoris_compat import to_lycoris_readable
    from personalize.formats.svd import adapter_to_lora

    args.to = "lora-svd" if args.to == "lora" else args.to
    if args.to == "lora-svd" and full_finetune_unet(Path(args.input)) is not None:
        return extract_lora(Path(args.input), Path(args.output), args.model, args.rank or 16)
    model = load_model(args.model) if args.model else None
    if args.to == "lora-svd" and model is None:
        raise UserError("--to lora-svd needs the base model (--model) to compute each module's weight delta")
    if args.rank is not None and args.to != "lora-svd":
        raise UserError("--rank only applies to --to lora-svd")
    found = read_adapter(args.input, model, allow_pickle=args.allow_pickle)
    family = args.family or guess_family(found)
    components = found.components
    method = found.method
    if args.to == "lora-svd":
        targets = model_components(model)
        converted, lines = {}, []
        for component, sd in components.items():
            converted[component], report = adapter_to_lora(sd, targets[component], args.rank or 16)
            lines += [f"{component}.{path}: {error:.2e}" for path, error in report.items() if path != "overall"]
            lines.append(f"{component} overall relative error: {report['overall']:.3e}")
        components, method = converted, "lora"
    output = Path(args.output)
    files: dict[str, tuple[dict, dict[str, str]]] = {}
    texts: dict[str, str] = {}
    ours = {k: v for k, v in found.metadata.items() if k.startswith("personalize_")}
    ours["personalize_method"] = method
    layout = args.to if args.to != "lora-svd" else ("peft" if family in ("llm", "vlm") else "diffusers")
    single_file = output.suffix == ".safetensors"
    if single_file and layout == "peft":
        raise UserError("the peft layout is a folder (adapter_config.json + adapter_model.safetensors); give a folder")
    folder = output.parent if single_file else output
    if components and layout == "diffusers":
        tensors, metadata = diffusers.to_diffusers(components)
        files[output.name if single_file else diffusers.DIFFUSERS_FILE] = (tensors, {**metadata, **ours})
    elif components and layout in ("kohya", "lycoris"):
        ss = kohya.kohya_metadata(components, method=method, family=family, hyper={}, output_name=output.stem)
        tensors = kohya.to_kohya(components, family, _unet_config(model))
        if layout == "lycoris":
            tensors, rewritten = to_lycoris_readable(tensors)
            print(f"{len(rewritten)} LoKr/KronA module(s) rewritten for LyCORIS's loader (exact: factor 1)")
        files[output.name if single_file else f"{output.name}.safetensors"] = (tensors, {**ss, **ours})
    elif components:
        for component, sd in components.items():
            prefix = "" if len(components) == 1 else f"{component}/"
            task = "CAUSAL_LM" if family == "llm" else None
            tensors, config = peft.to_peft(sd, task_type=task)
            files[prefix + peft.WEIGHTS_FILE] = (tensors, {"format": "pt", **ours})
            texts[prefix + peft.CONFIG_FILE] = json.dumps(config, indent=2, sort_keys=True)
    if found.embeddings and not single_file:
        for relative, tensors in embeddings_files(found.embeddings).items():
            files[relative] = (tensors, {})
    if not files:
        raise UserError(f"{args.input} holds nothing to write as {args.to}")
    for relative in texts:
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
    folder.mkdir(parents=True, exist_ok=True)
    for path in _write_all(folder, files, texts):
        print(path)
    if args.to == "lora-svd":
        print("\n".join(lines))
    return 0


def full_finetune_unet(folder: Path) -> Path | None:
    """The `unet/` folder of a `personalize train --method full` output, else None."""
    unet = folder / "unet"
    return unet if folder.is_dir() and unet.is_dir() and any(unet.glob("*.safetensors")) else None


def extract_lora(folder: Path, output: Path, base: str | None, rank: int) -> int:
    """A full fine-tune's UNet minus its base, per layer, as a rank-R LoRA (diffusers + kohya files).

    The base is `--base`/`--model`, else the model named in the run's config.yaml; the report gives each
    layer's relative error ||dW - up @ down||_F / ||dW||_F and the overall one."""
    import yaml
    from safetensors.torch import load_file

    from personalize.formats.io import save_adapter
    from personalize.formats.svd import checkpoint_deltas, deltas_to_lora
    from personalize.models import detect_family

    if base is None:
        config = folder / "config.yaml"
        base = (yaml.safe_load(config.read_text()) or {}).get("model") if config.is_file() else None
        if not base:
            raise UserError(f"{folder} has no config.yaml naming its base; pass --base MODEL")
    if output.suffix == ".safetensors":
        raise UserError("a LoRA extracted from a full fine-tune is written as a folder (diffusers + kohya files)")
    tuned: dict = {}
    for file in sorted(full_finetune_unet(folder).glob("*.safetensors")):  # type: ignore[union-attr]
        tuned.update(load_file(file))
    pipe = load_model(base)
    unet = getattr(pipe, "unet", None)
    if unet is None:
        raise UserError(f"{base} has no UNet to subtract; pass --base with the model {folder} was trained from")
    deltas = checkpoint_deltas(tuned, unet.state_dict())
    if not deltas:
        raise UserError(f"{folder}/unet equals {base}: there is no difference to extract")
    lora, report = deltas_to_lora(deltas, rank)
    files = save_adapter(
        output,
        {"unet": lora},
        method="lora",
        family=detect_family(pipe),
        hyper={"rank": rank, "alpha": rank},
        base_model=base,
        output_name=output.name,
        unet_config=_unet_config(pipe),
    )
    for path in files:
        print(path)
    for layer, error in report.items():
        if layer != "overall":
            print(f"unet.{layer}: {error:.2e}")
    print(f"unet overall relative error: {report['overall']:.3e} ({len(deltas)} layers, rank {rank})")
    return 0


def target_name(module: str) -> str:
    """A layer's name inside its block: "...transformer_blocks.0.attn1.to_q" -> "attn1.to_q"."""
    return re.sub(r"^(.*\.)?\w*(blocks|layers|attentions|resnets|layer|h)\.\d+\.", "", module)


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def adapter_files(path: Path) -> list[Path]:
    """The files an adapter consists of: the file itself, or in a run folder the adapter and embedding
    files read from it (not its checkpoints, samples or cards)."""
    from personalize.formats import detect, peft

    if path.is_file():
        return [path]
    adapter, embedding_files = detect.folder_files(path)
    files = list(embedding_files)
    if adapter is not None:
        layout, where = adapter
        files.append(where / peft.WEIGHTS_FILE if layout == "peft" else where)
    return files


def run_inspect(args: argparse.Namespace) -> int:
    from personalize.adapters import group_by_module
    from personalize.formats.canonical import alpha_of, method_of, parameter_count, rank_of
    from personalize.formats.io import read_adapter

    path = Path(args.path)
    if not path.exists():
        raise UserError(f"{path} does not exist")
    found = read_adapter(path, None, allow_pickle=args.allow_pickle)
    print(f"path         {path}")
    print(f"layout       {found.layout}")
    print(f"method       {found.method}")
    print(f"family guess {guess_family(found)}")
    print(f"parameters   {parameter_count(found.components):,}")
    size = sum(_size(file) for file in adapter_files(path))
    folder = f" (the whole folder: {_size(path) / 1e6:.2f} MB)" if path.is_dir() else ""
    print(f"file size    {size / 1e6:.2f} MB{folder}")
    rows: Counter = Counter()
    targets: dict[tuple, Counter] = defaultdict(Counter)
    modules = []
    for component, sd in found.components.items():
        for module, group in group_by_module(sd).items():
            kind = "conv" if any(v.dim() == 4 for v in group.values()) else "linear"
            alpha = alpha_of(group)
            row = (component, method_of(group), kind, rank_of(group) or "-", "-" if alpha is None else f"{alpha:g}")
            rows[row] += 1
            targets[row][target_name(module)] += 1
            modules.append((f"{component}.{module}", *row[1:]))
    if rows:
        header = ("component", "method", "layer", "rank", "alpha", "modules", "targets")
        table = [
            (*(str(x) for x in row), str(count), ", ".join(f"{t} x{n}" for t, n in sorted(targets[row].items())))
            for row, count in sorted(rows.items(), key=lambda item: tuple(map(str, item[0])))
        ]
        _print_table(header, table)
    if args.modules and modules:
        _print_table(("module", "method", "layer", "rank", "alpha"), [tuple(map(str, m)) for m in modules])
    for token, parts in found.embeddings.items():
        shapes = ", ".join(f"{c} {tuple(t.shape)}" for c, t in parts.items())
        print(f"embedding    {token}: {shapes}")
    shown = {k: v for k, v in found.metadata.items() if k != "peft_config"}
    for key in sorted(shown):
        value = shown[key] if len(shown[key]) <= 100 else shown[key][:97] + "..."
        print(f"metadata     {key} = {value}")
    return 0


def _print_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    for line in [header, tuple("-" * w for w in widths), *rows]:
        print("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())
