"""Merging rank-32 SDXL-shape LoRAs: `personalize merge` vs peft's `add_weighted_adapter`, time and peak memory.

    python -m benchmarks.merge [--inputs 10] [--layers 16] [--methods cat,linear,ties,svd] [--rounds 3]

The LoRA files have SDXL's UNet attention shapes (to_q/to_k/to_v/to_out.0 of its 70 transformer blocks:
560 layers, widths 640/1280, cross-attention inputs 2048), rank 32, alpha 32, fp16, in the diffusers
layout; `--layers N` keeps every k-th of them so that all shapes appear (peft's full SVD of a 1280 x 2048
delta takes seconds on a busy 2-core CPU; the cost of both tools grows linearly with the layer count).

Each candidate runs in its own fresh process, end to end: files in, merged adapter file out.
- ours: `personalize.merge.merge_adapters(files, method=M, rank=32)` (reads one layer of each input at a time);
- peft: a model with the same Linear layers (base weights allocated but never touched), every LoRA loaded as
  a named adapter (`add_adapter` + `set_peft_model_state_dict`), `add_weighted_adapter(..., combination_type=M,
  svd_rank=32, density=0.5)`, `save_pretrained(selected_adapters=["merged"])`.
Peak memory is the process's peak RSS (VmHWM, reset just before the work starts, after imports) above its
RSS at that moment. The candidates alternate within each round; the table gives medians over the rounds and the spread.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RANK = 32
PEFT_TYPES = {
    "cat": "cat",
    "linear": "linear",
    "ties": "ties",
    "svd": "svd",
    "dare": "dare_linear",
    "dare-ties": "dare_ties",
}


def sdxl_attention_shapes() -> dict[str, tuple[int, int]]:
    """{module path: (out, in)} of SDXL's UNet attention projections, from its config (no weights)."""
    import torch
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(
            sample_size=128,
            block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            layers_per_block=2,
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
    names = (
        "attn1.to_q",
        "attn1.to_k",
        "attn1.to_v",
        "attn1.to_out.0",
        "attn2.to_q",
        "attn2.to_k",
        "attn2.to_v",
        "attn2.to_out.0",
    )
    return {
        path: (module.out_features, module.in_features)
        for path, module in unet.named_modules()
        if path.endswith(names) and isinstance(module, torch.nn.Linear)
    }


def write_inputs(folder: Path, count: int, layers: int) -> list[Path]:
    import torch
    from safetensors.torch import save_file

    shapes = sdxl_attention_shapes()
    stride = max(1, len(shapes) // layers)
    kept = dict(list(shapes.items())[::stride][:layers])
    files = []
    for index in range(count):
        generator = torch.Generator().manual_seed(index)
        tensors = {}
        for path, (out, inp) in kept.items():
            tensors[f"unet.{path}.lora_A.weight"] = (torch.randn(RANK, inp, generator=generator) / RANK).half()
            tensors[f"unet.{path}.lora_B.weight"] = (torch.randn(out, RANK, generator=generator) * 0.01).half()
        metadata = {"lora_adapter_metadata": json.dumps({"unet.r": RANK, "unet.lora_alpha": RANK})}
        file = folder / f"lora{index}.safetensors"
        save_file(tensors, str(file), metadata=metadata)
        files.append(file)
    return files


def rss_mb() -> float:
    """The RSS now; also resets the process's peak RSS (VmHWM) to it, so that the peak counts the work only."""
    with open("/proc/self/clear_refs", "w") as stream:
        stream.write("5")
    with open("/proc/self/statm") as stream:
        return int(stream.read().split()[1]) * resource.getpagesize() / 2**20


def peak_mb() -> float:
    with open("/proc/self/status") as stream:
        line = next(line for line in stream if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024


def run_ours(files: list[str], method: str, out: str) -> dict:
    import personalize.formats.cli
    import personalize.formats.io
    import personalize.merge.output
    import personalize.models  # noqa: F401 - imported before the clock, as peft's modules are
    from personalize.merge import merge_adapters

    start_rss, start = rss_mb(), time.perf_counter()
    merge_adapters(files, method=method, rank=RANK if method == "svd" else None, density=0.5, output=out)
    return {"seconds": time.perf_counter() - start, "start_rss": start_rss}


def _skeleton(paths: list[tuple[str, tuple[int, int]]]):
    import torch
    from torch import nn

    root = nn.Module()
    for path, (out, inp) in paths:
        parent = root
        *parents, leaf = path.split(".")
        for name in parents:
            if not hasattr(parent, name):
                parent.add_module(name, nn.Module())
            parent = getattr(parent, name)
        layer = nn.Linear(inp, out, bias=False, device="meta").to_empty(device="cpu")  # pages never touched
        parent.add_module(leaf, layer)
    root.forward = lambda x: x  # type: ignore[method-assign]
    return root, torch


def run_peft(files: list[str], method: str, out: str) -> dict:
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(files[0], framework="pt") as handle:
        keys = list(handle.keys())
        shapes = {}
        for key in keys:
            if key.endswith("lora_A.weight"):
                path = key[len("unet.") : -len(".lora_A.weight")]
                a = handle.get_slice(key).get_shape()
                b = handle.get_slice(key.replace("lora_A", "lora_B")).get_shape()
                shapes[path] = (b[0], a[1])
    model, _ = _skeleton(list(shapes.items()))
    start_rss, start = rss_mb(), time.perf_counter()
    config = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=list(shapes))
    names = [f"a{i}" for i in range(len(files))]
    peft_model = None
    for name, file in zip(names, files):
        if peft_model is None:
            peft_model = get_peft_model(model, config, adapter_name=name)
        else:
            peft_model.add_adapter(name, config)
        state = {f"base_model.model.{k[len('unet.') :]}": v for k, v in load_file(file).items()}
        set_peft_model_state_dict(peft_model, state, adapter_name=name)
    merge_start = time.perf_counter()
    peft_model.add_weighted_adapter(
        names,
        [1.0 / len(names)] * len(names),
        "merged",
        combination_type=PEFT_TYPES[method],
        svd_rank=RANK,
        density=0.5,
    )
    merge_seconds = time.perf_counter() - merge_start
    peft_model.save_pretrained(out, selected_adapters=["merged"])
    return {"seconds": time.perf_counter() - start, "start_rss": start_rss, "merge_seconds": merge_seconds}


def worker(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    run = run_ours if args.worker == "ours" else run_peft
    files = args.files.split(",")
    if args.worker == "ours":  # the same weights as peft's: 1 / n each
        files = [f"{f}:{1.0 / len(files)}" for f in files]
    result = run(files, args.method, args.out)
    result["peak_mb"] = max(0.0, peak_mb() - result.pop("start_rss"))
    print(json.dumps(result))


def measure(candidate: str, method: str, files: list[Path], scratch: Path, threads: int) -> dict:
    out = scratch / f"out-{candidate}-{method}"
    command = [
        sys.executable,
        "-m",
        "benchmarks.merge",
        "--worker",
        candidate,
        "--method",
        method,
        "--files",
        ",".join(map(str, files)),
        "--out",
        str(out),
        "--threads",
        str(threads),
    ]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{candidate} {method} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--inputs", default="10", help="number(s) of LoRAs, comma-separated (e.g. 2,10)")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--methods", default="cat,linear,ties,svd")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", choices=("ours", "peft"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--method", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--files", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        scratch = Path(tmp)
        for count in map(int, args.inputs.split(",")):
            folder = scratch / f"n{count}"
            folder.mkdir()
            files = write_inputs(folder, count, args.layers)
            for method in args.methods.split(","):
                results: dict[str, list[dict]] = {"ours": [], "peft": []}
                for round_ in range(args.rounds):
                    order = ["ours", "peft"] if round_ % 2 == 0 else ["peft", "ours"]
                    for candidate in order:
                        results[candidate].append(measure(candidate, method, files, scratch, args.threads))
                rows.append((count, method, results))
                print(_row(count, method, results), flush=True)
    print()
    print(
        "| inputs | method | ours s | peft s (its merge step) | time ours/peft | ours MB | peft MB | memory ours/peft |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for count, method, results in rows:
        print(_row(count, method, results))


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def _row(count: int, method: str, results: dict[str, list[dict]]) -> str:
    ours_s = [r["seconds"] for r in results["ours"]]
    peft_s = [r["seconds"] for r in results["peft"]]
    peft_merge = [r["merge_seconds"] for r in results["peft"]]
    ours_m = [r["peak_mb"] for r in results["ours"]]
    peft_m = [r["peak_mb"] for r in results["peft"]]
    ratio_t = statistics.median(ours_s) / statistics.median(peft_s)
    ratio_m = statistics.median(ours_m) / max(statistics.median(peft_m), 1e-9)
    return (
        f"| {count} | {method} | {_spread(ours_s)} | {_spread(peft_s)} ({statistics.median(peft_merge):.2f}) "
        f"| {ratio_t:.2f}x | {_spread(ours_m)} | {_spread(peft_m)} | {ratio_m:.2f}x |"
    )


if __name__ == "__main__":
    main()
