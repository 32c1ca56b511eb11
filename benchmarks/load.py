"""Seconds to load (and fuse) adapter files into an SD1.5-architecture pipeline: ours vs stock diffusers / LyCORIS.

    python -m benchmarks.load [--rounds 3] [--stack 10] [--threads 2]

The pipeline has SD1.5 shapes and random weights (benchmarks/sd15_arch.py). The LoRA files are what
diffusers' train_dreambooth_lora.py writes: rank 4 (alpha = rank) on the UNet attention projections
to_q/to_k/to_v/to_out.0, converted with `convert_state_dict_to_diffusers` and saved by
`save_lora_weights` as pytorch_lora_weights.safetensors. Compared:

- one LoRA: `personalize.pipelines.load_adapter` + `fuse` vs `pipe.load_lora_weights` + `pipe.fuse_lora`
  (also `fuse(keep_original=False)`, which keeps no copy of the base weights, as diffusers keeps none);
- `--stack` LoRAs loaded one after another (each under its own name; load time of the first and last
  one, to see how it grows) and then all fused;
- one LoKr file (kohya/LyCORIS keys, rank 4, factor -1, attention): ours vs LyCORIS's own
  `create_lycoris_from_weights` + `apply_to` (unfused) and + `merge_to` (fused).

Candidates alternate within each round (the order rotates from round to round) and the pipeline is
reset to its base weights after each, so every one starts from the same state; the table gives
medians over the rounds (after one warm-up round).
"""

from __future__ import annotations

import argparse
import logging
import re
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from benchmarks.sd15_arch import sd15_pipeline
from personalize import adapters
from personalize.pipelines import fuse, load_adapter, unload_adapter

RANK = 4
ATTENTION = re.compile(r".*attn[12]\.(to_q|to_k|to_v|to_out\.0)")


def attention_layers(unet: nn.Module) -> dict[str, nn.Linear]:
    return {path: module for path, module in unet.named_modules() if ATTENTION.fullmatch(path)}


def write_dreambooth_lora(unet: nn.Module, folder: Path, seed: int) -> Path:
    """A LoRA folder as diffusers' DreamBooth LoRA script saves it (gaussian A, trained-looking B)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers

    generator = torch.Generator().manual_seed(seed)
    peft_state = {}
    for path, layer in attention_layers(unet).items():
        peft_state[f"{path}.lora_A.weight"] = torch.randn(RANK, layer.in_features, generator=generator) / RANK
        peft_state[f"{path}.lora_B.weight"] = torch.randn(layer.out_features, RANK, generator=generator) * 0.01
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=convert_state_dict_to_diffusers(peft_state))
    return folder


def write_lokr(pipe, folder: Path) -> Path:
    """A kohya/LyCORIS LoKr file (lora_unet_* keys, ss_* metadata), written by personalize.formats."""
    from personalize.formats import save_adapter

    adapters.inject(pipe.unet, "lokr", targets="attention", name="made", rank=RANK, alpha=RANK, factor=-1)
    with torch.no_grad():
        for parameter in adapters.trainable_parameters(pipe.unet, "made"):
            parameter.normal_(0, 0.02)
    components = {"unet": {k: v.clone() for k, v in adapters.state_dict(pipe.unet, "made").items()}}
    adapters.remove(pipe.unet, "made")
    hyper = {"rank": RANK, "alpha": RANK, "factor": -1}
    paths = save_adapter(folder, components, method="lokr", family="sd1", hyper=hyper, output_name="lokr")
    return next(p for p in paths if p.suffix == ".safetensors")


class Restorer:
    """Puts the UNet attention weights back after a tool that merges without a way back (LyCORIS)."""

    def __init__(self, unet: nn.Module) -> None:
        self.layers = attention_layers(unet)
        self.kept = {path: layer.weight.detach().clone() for path, layer in self.layers.items()}

    def __call__(self) -> None:
        with torch.no_grad():
            for path, layer in self.layers.items():
                layer.weight.copy_(self.kept[path])


def timed(steps: list[Callable[[], object]]) -> list[float]:
    """Seconds of each step, run in order."""
    out = []
    for step in steps:
        start = time.perf_counter()
        step()
        out.append(time.perf_counter() - start)
    return out


def stock_reset(pipe) -> None:
    pipe.unfuse_lora()
    pipe.unload_lora_weights()


def candidates(pipe, loras: list[Path], lokr: Path, restore: Restorer) -> dict[str, Callable[[], dict[str, float]]]:
    """name -> a function that runs one trial and returns {measure: seconds}, leaving the base pipeline."""
    names = [f"a{i}" for i in range(len(loras))]

    def ours_one() -> dict[str, float]:
        load, fused = timed([lambda: load_adapter(pipe, loras[0], name="a0"), lambda: fuse(pipe)])
        unload_adapter(pipe)
        return {"load": load, "load+fuse": load + fused}

    def ours_one_no_copy() -> dict[str, float]:  # fuse without keeping the base weights, as diffusers does
        load, fused = timed([lambda: load_adapter(pipe, loras[0], name="a0"), lambda: fuse(pipe, keep_original=False)])
        unload_adapter(pipe)
        return {"load": load, "load+fuse": load + fused}

    def stock_one() -> dict[str, float]:
        load, fused = timed([lambda: pipe.load_lora_weights(loras[0], adapter_name="a0"), lambda: pipe.fuse_lora()])
        stock_reset(pipe)
        return {"load": load, "load+fuse": load + fused}

    def ours_stack() -> dict[str, float]:
        loads = timed([lambda i=i: load_adapter(pipe, loras[i], name=names[i]) for i in range(len(loras))])
        (fused,) = timed([lambda: fuse(pipe)])
        unload_adapter(pipe)
        return {"load all": sum(loads), "first": loads[0], "last": loads[-1], "load+fuse": sum(loads) + fused}

    def stock_stack() -> dict[str, float]:
        loads = timed([lambda i=i: pipe.load_lora_weights(loras[i], adapter_name=names[i]) for i in range(len(loras))])
        (fused,) = timed([lambda: (pipe.set_adapters(names), pipe.fuse_lora(adapter_names=names))])
        stock_reset(pipe)
        return {"load all": sum(loads), "first": loads[0], "last": loads[-1], "load+fuse": sum(loads) + fused}

    def ours_lokr() -> dict[str, float]:
        load, fused = timed([lambda: load_adapter(pipe, lokr, name="k"), lambda: fuse(pipe)])
        unload_adapter(pipe)
        return {"load": load, "load+fuse": load + fused}

    def lycoris_lokr() -> dict[str, float]:
        from lycoris import create_lycoris_from_weights

        def apply() -> None:
            network, _ = create_lycoris_from_weights(1.0, str(lokr), pipe.unet)
            network.apply_to()
            network.restore()

        def merge() -> None:
            network, _ = create_lycoris_from_weights(1.0, str(lokr), pipe.unet)
            network.merge_to(1.0)

        (load,) = timed([apply])
        (merged,) = timed([merge])
        restore()
        return {"load": load, "load+fuse": merged}

    return {
        "ours lora": ours_one,
        "ours lora, no copy": ours_one_no_copy,
        "diffusers lora": stock_one,
        f"ours {len(loras)} loras": ours_stack,
        f"diffusers {len(loras)} loras": stock_stack,
        "ours lokr": ours_lokr,
        "lycoris lokr": lycoris_lokr,
    }


PEERS = {"ours lora": "diffusers lora", "ours lora, no copy": "diffusers lora", "ours lokr": "lycoris lokr"}


def measure(rounds: int, stack: int) -> dict[str, dict[str, float]]:
    from lycoris import LycorisNetwork

    LycorisNetwork.apply_preset({"lora_prefix": "lora_unet"})  # read the same kohya file we read
    pipe = sd15_pipeline()
    with tempfile.TemporaryDirectory() as tmp:
        loras = [write_dreambooth_lora(pipe.unet, Path(tmp) / f"lora{i}", seed=i) for i in range(stack)]
        lokr = write_lokr(pipe, Path(tmp) / "lokr")
        trials = candidates(pipe, loras, lokr, Restorer(pipe.unet))
        PEERS[f"ours {stack} loras"] = f"diffusers {stack} loras"
        times: dict[str, dict[str, list[float]]] = {name: {} for name in trials}
        names = list(trials)
        for r in range(rounds + 1):
            for name in names[r % len(names) :] + names[: r % len(names)]:  # rotated: no fixed first slot
                result = trials[name]()
                if r:  # round 0 warms up
                    for key, seconds in result.items():
                        times[name].setdefault(key, []).append(seconds)
    return {name: {key: statistics.median(v) for key, v in by_key.items()} for name, by_key in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--stack", type=int, default=10)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in ("lycoris", "diffusers", "peft"):
        logging.getLogger(name).setLevel(logging.ERROR)
    print(f"torch {torch.__version__}, {args.threads} threads, fp32 CPU, SD1.5 shapes, {args.rounds} rounds (median s)")
    results = measure(args.rounds, args.stack)
    print(f"{'candidate':<20} {'measure':<10} {'seconds':>9} {'x peer':>8}")
    for name, by_key in results.items():
        peer = PEERS.get(name)
        for key, seconds in by_key.items():
            ratio = f"{seconds / results[peer][key]:8.2f}" if peer else f"{'':>8}"
            print(f"{name:<20} {key:<10} {seconds:9.3f} {ratio}")


if __name__ == "__main__":
    main()
