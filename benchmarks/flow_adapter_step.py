"""LoKr / KronA against LoRA on the Flux transformer's Linear layers: one training step (forward + backward)
of the reduced-depth, real-width FLUX.1-dev build, same targets (attention + feed-forward), in one process,
methods interleaved per round so that the machine's load hits all of them alike.

    python -m benchmarks.flow_adapter_step [--rounds 3] [--tokens 256] [--threads 2]

Issue 18's goal: LoKr / KronA step <= 1.3x our LoRA step at the same targets. The whole-run benchmark
(benchmarks/flow_step.py) pays loading and caching per process; this one times the step alone.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch


def build(method: str, base: torch.nn.Module) -> torch.nn.Module:
    from personalize import adapters
    from personalize.models.families.flux import ATTENTION, FEED_FORWARD

    transformer = copy.deepcopy(base)
    hyper = {"rank": 4, "alpha": 4.0} if method in ("lora", "lokr") else {}
    adapters.inject(transformer, method, targets=ATTENTION + FEED_FORWARD, name="bench", **hyper)
    return transformer


def step(transformer: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> None:
    out = transformer(**inputs, return_dict=False)[0]  # (1, tokens, 64)
    out.square().mean().backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=256, help="image tokens: 256 px -> 16 x 16 packed patches")
    parser.add_argument("--text-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from personalize.models.tiny_flow import reduced_flux

    base = reduced_flux(1, 1).transformer.float().requires_grad_(False)
    config = base.config
    torch.manual_seed(0)
    inputs = {
        "hidden_states": torch.randn(1, args.tokens, config.in_channels),
        "encoder_hidden_states": torch.randn(1, args.text_tokens, config.joint_attention_dim),
        "pooled_projections": torch.randn(1, config.pooled_projection_dim),
        "timestep": torch.tensor([0.5]),
        "img_ids": torch.zeros(args.tokens, 3),
        "txt_ids": torch.zeros(args.text_tokens, 3),
        "guidance": torch.tensor([3.5]) if config.guidance_embeds else None,
    }
    methods = ["lora", "lokr", "krona"]
    models = {method: build(method, base) for method in methods}
    for model in models.values():
        step(model, inputs)  # warm-up
    seconds: dict[str, list[float]] = {method: [] for method in methods}
    for round_index in range(args.rounds):
        for method in methods[round_index % 3 :] + methods[: round_index % 3]:  # rotate the order
            started = time.perf_counter()
            step(models[method], inputs)
            seconds[method].append(time.perf_counter() - started)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.tokens} image + {args.text_tokens} text tokens")
    lora = statistics.median(seconds["lora"])
    for method in methods:
        trained = sum(p.numel() for p in models[method].parameters() if p.requires_grad)
        ratios = [mine / ref for mine, ref in zip(seconds[method], seconds["lora"])]
        median = statistics.median(seconds[method])
        print(
            f"{method:6s} {trained:>9d} trained  {median:.3f} s/step  {median / lora:.2f}x LoRA"
            f"  (paired rounds {min(ratios):.2f}-{max(ratios):.2f})"
        )


if __name__ == "__main__":
    main()
