"""OFT / BOFT layer step time (forward + backward), ours vs peft's (and LyCORIS's), at SD1.5 UNet shapes.

    python -m benchmarks.oft [--rounds 15] [--threads 2] [--repeats 3]

Every candidate wraps its own copy of the same frozen layer; the input requires grad (as inside a
network). Shapes: SD1.5 at 512 px, batch 1 -- attention projections on the 64x64, 32x32 and 16x16
latents (4096 x 320, 1024 x 640, 256 x 1280 tokens x channels) and a 3x3 ResNet conv on 320 channels
at 32x32. Block size 32 (peft's default). Compared, each against its peer (ratio < 1: we are faster):

- OFT: peft's OFTConfig defaults (Cayley-Neumann, 5 terms) vs ours in peft's form (input side, exact
  Cayley; what we save for peft) and ours in LyCORIS's form (output side; what `--method oft` trains on
  a UNet); also LyCORIS's DiagOFT module (its default, weight-rebuilding mode) beside the latter.
- BOFT: peft's BOFTConfig (on a CPU peft builds one butterfly factor, without its CUDA kernel) vs ours with
  one stage in peft's form; ours with the full butterfly (log2(blocks) + 1 stages) vs LyCORIS's BOFT.

Candidates run interleaved (order rotated per round) so machine noise hits all alike; each repeat is a
fresh set of rounds, and the table gives the median over rounds of each repeat, then the spread.
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import time
import warnings

import torch
from torch import nn

from benchmarks.adapters import step
from personalize import adapters

BLOCK = 32
SHAPES = {
    "attn 4096x320": ("linear", (1, 4096, 320), 320),
    "attn 1024x640": ("linear", (1, 1024, 640), 640),
    "attn 256x1280": ("linear", (1, 256, 1280), 1280),
    "conv3x3 320@32x32": ("conv", (1, 320, 32, 32), 320),
}


def ours(method: str, base: nn.Module, **hyper) -> nn.Module:
    holder = nn.Sequential(copy.deepcopy(base))
    adapters.inject(holder, method, targets="0", name="a", block_size=BLOCK, **hyper)
    return holder


def peft_wrapped(method: str, base: nn.Module) -> nn.Module:
    import peft

    if method == "oft":
        config = peft.OFTConfig(r=0, oft_block_size=BLOCK, target_modules=["0"])
    else:
        config = peft.BOFTConfig(boft_block_size=BLOCK, target_modules=["0"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's BOFT reports that its CUDA kernel cannot be built here
        return peft.get_peft_model(nn.Sequential(copy.deepcopy(base)), config)


class _Held(nn.Module):
    def __init__(self, layer: nn.Module, module: nn.Module) -> None:
        super().__init__()
        self.layer, self.lycoris_module = layer, module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def lycoris_wrapped(method: str, base: nn.Module) -> nn.Module:
    from lycoris.modules.boft import ButterflyOFTModule
    from lycoris.modules.diag_oft import DiagOFTModule

    layer = copy.deepcopy(base)
    cls = DiagOFTModule if method == "oft" else ButterflyOFTModule
    module = cls("bench", layer, lora_dim=BLOCK)
    module.apply_to()
    return _Held(layer, module)


def candidates(base: nn.Module, only: str = "all") -> dict[str, tuple[nn.Module, str | None]]:
    """name -> (model, peer name or None); `only`: "oft" or "boft" keeps the base and that method's rows."""
    every = {
        "base (frozen)": (nn.Sequential(copy.deepcopy(base)), None),
        "peft oft": (peft_wrapped("oft", base), None),
        "ours oft (peft form)": (ours("oft", base, on_input=True), "peft oft"),
        "lycoris diag-oft": (lycoris_wrapped("oft", base), None),
        "ours oft (lycoris form)": (ours("oft", base, on_input=False), "peft oft"),
        "peft boft": (peft_wrapped("boft", base), None),
        "ours boft 1 stage": (ours("boft", base, on_input=True, stages=1), "peft boft"),
        "lycoris boft": (lycoris_wrapped("boft", base), None),
        "ours boft full": (ours("boft", base, on_input=False), "lycoris boft"),
    }
    keep = {"oft": {"oft", "diag-oft"}, "boft": {"boft"}}.get(only)
    return {
        name: row for name, row in every.items() if keep is None or name == "base (frozen)" or keep & set(name.split())
    }


def measure(
    rounds: int, only: str = "all", shapes: tuple[str, ...] = ()
) -> list[tuple[str, str, float, float, float | None]]:
    rows = []
    for shape_name, (kind, x_shape, channels) in SHAPES.items():
        if shapes and not any(shape_name.startswith(prefix) for prefix in shapes):
            continue
        torch.manual_seed(0)
        if kind == "linear":
            base = nn.Linear(channels, channels)
        else:
            base = nn.Conv2d(channels, channels, 3, padding=1)
        base.requires_grad_(False)
        models = candidates(base, only)
        x = torch.randn(*x_shape, requires_grad=True)
        times: dict[str, list[float]] = {name: [] for name in models}
        names = list(models)
        for r in range(rounds + 2):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                start = time.perf_counter()
                step(models[name][0], x)
                if r >= 2:  # two warm-up rounds
                    times[name].append(time.perf_counter() - start)
        medians = {name: statistics.median(t) * 1000 for name, t in times.items()}
        for name, (_, peer) in models.items():
            peer_ratio = medians[name] / medians[peer] if peer else None
            rows.append((shape_name, name, medians[name], medians[name] / medians["base (frozen)"], peer_ratio))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--only", choices=["all", "oft", "boft"], default="all", help="one method's rows")
    parser.add_argument("--shapes", default="", help="comma-separated shape prefixes, e.g. attn,conv")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("lycoris").setLevel(logging.ERROR)
    print(f"torch {torch.__version__}, {args.threads} threads, block {BLOCK}, {args.rounds} rounds x {args.repeats}")
    shapes = tuple(prefix for prefix in args.shapes.split(",") if prefix)
    runs = [measure(args.rounds, args.only, shapes) for _ in range(args.repeats)]
    print(f"{'shape':<18} {'candidate':<24} {'median ms':>10} {'x base':>7} {'x peer':>7} {'x peer, all runs':>18}")
    for i, (shape, name, ms, vs_base, vs_peer) in enumerate(runs[0]):
        peer = f"{vs_peer:7.2f}" if vs_peer is not None else f"{'':>7}"
        spread = ""
        if vs_peer is not None:
            ratios = [run[i][4] for run in runs]
            spread = f"{min(ratios):.2f}-{max(ratios):.2f}"
        print(f"{shape:<18} {name:<24} {ms:10.2f} {vs_base:7.2f} {peer} {spread:>18}")


if __name__ == "__main__":
    main()
