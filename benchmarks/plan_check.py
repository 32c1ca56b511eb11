"""The memory planner against measurement: planned CPU peak vs the peak RSS of real `personalize train` runs.

Random-init Flux and SD3 transformers at several widths (reduced depth, personalize.models.tiny_flow), saved
locally, each trained for 2 steps at 256 px (LoRA rank 4, batch 1) in a fresh process; the child's VmHWM
(the peak RSS of its own address space; ru_maxrss would carry this parent's high-water mark across fork +
exec) is the measurement, `personalize.plan.plan(folder, settings, "cpu").peak` the estimate.
Cases: fp32, bf16, gradient checkpointing and `--quantize nf4`. A case marked `:load` stops at the
transformer's first training forward and is compared with the planned loading phase (CPU: the mapped fp32
file + its bf16 copy): on a CPU without bf16 instructions a bf16 training step takes hours.

    python -m benchmarks.plan_check [--cases flux-1024:no flux-1024:no:ckpt sd3-768:no:nf4 flux-1024:bf16:load ...]
        [--trace]   # also sample the child's RSS (anonymous / file-backed) every 20 ms and print where it peaked
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "examples" / "cat"
GB = 1024**3

# name: (family, layers, single layers or 0, transformer overrides); widths 512 to FLUX.1-dev's 3072
BUILDS: dict[str, tuple[str, int, int, dict[str, Any]]] = {
    "flux-512": ("flux", 1, 2, {"num_attention_heads": 4, "joint_attention_dim": 1024}),
    "flux-1024": ("flux", 2, 2, {"num_attention_heads": 8, "joint_attention_dim": 2048}),
    "flux-1536": ("flux", 1, 2, {"num_attention_heads": 12}),
    "flux-3072": ("flux", 1, 1, {}),
    "sd3-768": ("sd3", 2, 0, {"num_attention_heads": 12, "caption_projection_dim": 768, "pos_embed_max_size": 96}),
    "sd3-1536": ("sd3", 2, 0, {}),
}
DEFAULT_CASES = [
    "flux-512:no",
    "flux-1024:no",
    "flux-1024:bf16",
    "flux-1024:no:ckpt",
    "flux-1024:bf16:ckpt",
    "flux-1024:bf16:nf4",
    "flux-1536:bf16",
    "sd3-768:no",
    "sd3-768:bf16",
    "sd3-768:no:ckpt",
    "sd3-1536:bf16",
    "sd3-1536:bf16:ckpt",
    "sd3-1536:bf16:nf4",
]

# the child: `personalize train` in-process, then its own peak RSS
CHILD = r"""
import json, os, resource, sys
import torch

def report(code):
    # VmHWM, not ru_maxrss: ru_maxrss carries the parent's high-water mark across fork + exec
    hwm = [int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM")]
    peak = hwm[0] if hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print("MEASURED " + json.dumps({"code": code, "peak": peak}))

if os.environ.get("PLAN_CHECK_UNTIL_TRAINING"):
    def stop(module, args):
        if type(module).__name__ in ("FluxTransformer2DModel", "SD3Transformer2DModel"):
            report(0)
            sys.stdout.flush()
            os._exit(0)

    torch.nn.modules.module.register_module_forward_pre_hook(stop)
from personalize.cli import main
report(main(sys.argv[1:]))
"""


@dataclass(frozen=True)
class Case:
    build: str
    precision: str  # "no" (fp32) or "bf16"
    checkpointing: bool
    quantize: str
    until_training: bool = False

    @classmethod
    def parse(cls, text: str) -> Case:
        build, precision, *flags = text.split(":")
        if build not in BUILDS:
            raise SystemExit(f"unknown build {build!r}; choose from {', '.join(BUILDS)}")
        return cls(build, precision, "ckpt" in flags, "nf4" if "nf4" in flags else "", "load" in flags)

    @property
    def label(self) -> str:
        parts = ["fp32" if self.precision == "no" else self.precision]
        parts += ["checkpointing"] if self.checkpointing else []
        parts += [f"--quantize {self.quantize}"] if self.quantize else []
        parts += ["until training (loading phase)"] if self.until_training else []
        return ", ".join(parts)

    def flags(self) -> list[str]:
        flags = ["--mixed-precision", self.precision]
        flags += ["--gradient-checkpointing"] if self.checkpointing else []
        return flags + (["--quantize", self.quantize] if self.quantize else [])

    def settings(self) -> Any:
        from personalize.plan import Settings

        return Settings(
            resolution=256,
            rank=4,
            mixed_precision=self.precision,
            gradient_checkpointing=self.checkpointing,
            quantize=self.quantize,
        )


def save_build(name: str, workdir: Path) -> Path:
    """The random-init pipeline `name`, saved once under workdir."""
    from personalize.models.tiny_flow import reduced_flux, reduced_sd3

    folder = workdir / name
    if not (folder / "model_index.json").is_file():
        family, layers, single, overrides = BUILDS[name]
        pipe = reduced_flux(layers, single, **overrides) if family == "flux" else reduced_sd3(layers, **overrides)
        pipe.save_pretrained(folder)
    return folder


def measure(folder: Path, case: Case, out: Path, trace: bool = False, steps: int = 2) -> dict[str, Any]:
    """Peak RSS (bytes) of `personalize train` on `folder` in a fresh process; with `trace`, the sampled
    RSS curve's maxima of anonymous and file-backed pages too."""
    argv = ["train", "--images", str(IMAGES), "--model", str(folder), "--resolution", "256", "--steps", str(steps)]
    argv += ["--rank", "4", "--output", str(out), "--overwrite", "--set", "validation_images=0"]
    argv += ["--set", "checkpoint_every=0", "--set", f"data.cache_dir={out.parent / 'cache'}", *case.flags()]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    env.setdefault("OMP_NUM_THREADS", "1")
    if case.until_training:
        env["PLAN_CHECK_UNTIL_TRAINING"] = "1"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    samples: list[tuple[float, int, int]] = []
    sampler = threading.Thread(target=_sample, args=(child, samples), daemon=True) if trace else None
    if sampler:
        sampler.start()
    stdout, stderr = child.communicate()
    lines = [line for line in stdout.splitlines() if line.startswith("MEASURED ")]
    if child.returncode != 0 or not lines:
        raise RuntimeError(f"{case} failed (exit {child.returncode}):\n{stderr[-3000:]}")
    result = json.loads(lines[-1][len("MEASURED ") :])
    if samples:
        top = max(samples, key=lambda s: s[1] + s[2])
        result.update(anon_at_peak=top[1], file_at_peak=top[2], peak_at_s=top[0], max_file=max(s[2] for s in samples))
    return result


def _sample(child: subprocess.Popen, samples: list[tuple[float, int, int]]) -> None:
    start = time.perf_counter()
    status = Path(f"/proc/{child.pid}/status")
    while child.poll() is None:
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if line.startswith("Rss"))
        except (OSError, ValueError):
            break
        if "RssAnon" not in fields:  # exiting
            break
        anon = int(fields["RssAnon"].split()[0]) * 1024
        file = int(fields["RssFile"].split()[0]) * 1024 + int(fields["RssShmem"].split()[0]) * 1024
        samples.append((time.perf_counter() - start, anon, file))
        time.sleep(0.02)


def check(case: Case, workdir: Path, trace: bool = False) -> dict[str, Any]:
    from personalize.plan import plan

    folder = save_build(case.build, workdir)
    measured = measure(folder, case, workdir / "runs" / f"{case.build}-{case.label.replace(' ', '_')}", trace)
    estimate = plan(str(folder), case.settings(), "cpu")
    planned = max(estimate.loading, estimate.caching) if case.until_training else estimate.peak
    error = (planned - measured["peak"]) / measured["peak"]
    return {**measured, "planned": planned, "error": error, "parts": estimate.parts, "caching": estimate.caching}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=ROOT / "benchmarks" / ".cache" / "plan")
    parser.add_argument("--cases", nargs="+", default=DEFAULT_CASES, help="BUILD:no|bf16[:ckpt][:nf4]")
    parser.add_argument("--trace", action="store_true")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    print("| build | settings | planned | measured | error |\n| --- | --- | --- | --- | --- |", flush=True)
    for text in args.cases:
        case = Case.parse(text)
        row = check(case, args.workdir, args.trace)
        print(
            f"| {case.build} | {case.label} | {row['planned'] / GB:.2f} GB | {row['peak'] / GB:.2f} GB | "
            f"{row['error']:+.1%} |",
            flush=True,
        )
        if args.trace:
            parts = ", ".join(f"{k} {v / GB:.2f}" for k, v in row["parts"].items())
            print(
                f"    peak at {row['peak_at_s']:.0f} s: anon {row['anon_at_peak'] / GB:.2f} GB + file "
                f"{row['file_at_peak'] / GB:.2f} GB (max file {row['max_file'] / GB:.2f}); planned {parts}; "
                f"caching {row['caching'] / GB:.2f}",
                flush=True,
            )


if __name__ == "__main__":
    main()
