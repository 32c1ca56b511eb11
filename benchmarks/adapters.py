"""Forward+backward time of one wrapped layer, ours vs peft and LyCORIS, on SD1.5 UNet shapes.

    python -m benchmarks.adapters [--rounds 15] [--threads 2]

Every candidate wraps its own copy of the same frozen nn.Linear; the input requires grad (as inside
a network). Candidates run interleaved (one call each per round, order rotated) so that machine
noise hits all of them alike; the table gives medians in ms, the ratio to the frozen base layer and
the ratio to the named peer (peft for LoRA/DoRA/LoHa/LoKr, LyCORIS for its default and bypass modes).
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import time

import torch
from torch import nn

from personalize import adapters

SHAPES = {"to_q 1024x320": (1024, 320, 320), "ff 1024x320->2560": (1024, 320, 2560), "to_q 64x1280": (64, 1280, 1280)}
RANK = 8


def ours(method: str, base: nn.Linear, **hyper) -> nn.Module:
    holder = nn.Sequential(copy.deepcopy(base))
    adapters.inject(holder, method, targets="0", name="a", **hyper)
    return holder


def peft_wrapped(kind: str, base: nn.Linear) -> nn.Module:
    import peft

    configs = {
        "lora": peft.LoraConfig(r=RANK, lora_alpha=RANK, target_modules=["0"]),
        "dora": peft.LoraConfig(r=RANK, lora_alpha=RANK, target_modules=["0"], use_dora=True),
        "loha": peft.LoHaConfig(r=RANK, alpha=RANK, target_modules=["0"]),
        "lokr": peft.LoKrConfig(r=RANK, alpha=RANK, target_modules=["0"]),
    }
    return peft.get_peft_model(nn.Sequential(copy.deepcopy(base)), configs[kind])


def lycoris_wrapped(kind: str, base: nn.Linear, bypass: bool) -> nn.Module:
    from lycoris.modules.loha import LohaModule
    from lycoris.modules.lokr import LokrModule

    layer = copy.deepcopy(base)
    cls = LohaModule if kind == "loha" else LokrModule
    module = cls("bench", layer, lora_dim=RANK, alpha=RANK, bypass_mode=bypass)
    module.apply_to()
    return _Held(layer, module)


class _Held(nn.Module):
    """A layer whose forward LyCORIS replaced, plus the LyCORIS module (so its parameters are seen)."""

    def __init__(self, layer: nn.Module, lycoris_module: nn.Module) -> None:
        super().__init__()
        self.layer, self.lycoris_module = layer, lycoris_module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def candidates(base: nn.Linear) -> dict[str, tuple[nn.Module, str | None]]:
    """name -> (model, peer name or None)."""
    return {
        "base (frozen)": (nn.Sequential(copy.deepcopy(base)), None),
        "peft lora": (peft_wrapped("lora", base), None),
        "ours lora": (ours("lora", base, rank=RANK, alpha=RANK), "peft lora"),
        "peft dora": (peft_wrapped("dora", base), None),
        "ours dora": (ours("dora", base, rank=RANK, alpha=RANK), "peft dora"),
        "peft loha": (peft_wrapped("loha", base), None),
        "lycoris loha": (lycoris_wrapped("loha", base, bypass=False), None),
        "lycoris loha bypass": (lycoris_wrapped("loha", base, bypass=True), None),
        "ours loha": (ours("loha", base, rank=RANK, alpha=RANK), "peft loha"),
        "peft lokr": (peft_wrapped("lokr", base), None),
        "lycoris lokr": (lycoris_wrapped("lokr", base, bypass=False), None),
        "lycoris lokr bypass": (lycoris_wrapped("lokr", base, bypass=True), None),
        "ours lokr": (ours("lokr", base, rank=RANK, alpha=RANK), "peft lokr"),
        "ours krona": (ours("krona", base, a1=64, a2=8), "peft lokr"),
        "ours ia3": (ours("ia3", base), None),
    }


def step(model: nn.Module, x: torch.Tensor) -> None:
    for p in model.parameters():
        if p.requires_grad and p.grad is not None:
            p.grad = None
    model(x).sum().backward()


def measure(rounds: int) -> list[tuple[str, str, float, float, float | None]]:
    rows = []
    for shape_name, (tokens, d_in, d_out) in SHAPES.items():
        torch.manual_seed(0)
        base = nn.Linear(d_in, d_out).requires_grad_(False)
        models = candidates(base)
        x = torch.randn(1, tokens, d_in, requires_grad=True)
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
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.getLogger("lycoris").setLevel(logging.ERROR)
    print(f"torch {torch.__version__}, {args.threads} threads, rank {RANK}, {args.rounds} rounds, fp32 CPU")
    print(f"{'shape':<20} {'candidate':<22} {'median ms':>10} {'x base':>8} {'x peer':>8}")
    for shape, name, ms, vs_base, vs_peer in measure(args.rounds):
        peer = f"{vs_peer:8.2f}" if vs_peer is not None else f"{'':>8}"
        print(f"{shape:<20} {name:<22} {ms:10.2f} {vs_base:8.2f} {peer}")


if __name__ == "__main__":
    main()
