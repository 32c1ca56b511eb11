"""CPU thread settings for training: which one should the tool choose, so that no user needs an env var?

Runs `personalize train --images examples/cat` on a model (default: the demo, `--preset tiny`) in fresh
processes under several thread settings, interleaved round by round so that load drift hits all of them,
and prints the training loop's seconds per step (from metrics.json) and the whole command's wall time.

    python -m benchmarks.cpu_threads [--rounds 3] [--preset tiny] [--set KEY=VALUE ...]

Settings: `tool` (nothing set: what the tool chooses, `cpu_threads: auto`), `omp1` (OMP_NUM_THREADS=1,
what the Makefile used to set), `all` (`--set cpu_threads=all`: torch's default, one thread per core),
`passive` (all threads, OMP_WAIT_POLICY=PASSIVE: idle threads sleep instead of spinning).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS: dict[str, tuple[dict[str, str], list[str]]] = {  # name -> (environment, --set items)
    "tool": ({}, []),
    "omp1": ({"OMP_NUM_THREADS": "1"}, []),
    "all": ({}, ["cpu_threads=all"]),
    "passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, ["cpu_threads=all"]),
}


def run_once(name: str, preset: str, extra: list[str], workdir: Path) -> tuple[float, float]:
    """(loop seconds per step, wall seconds) of one training run in a fresh process."""
    environment, sets = SETTINGS[name]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    env.update(environment)
    output = workdir / f"{name}-{time.monotonic_ns()}"
    command = [sys.executable, "-m", "personalize", "train", "--images", str(ROOT / "examples" / "cat")]
    command += ["--preset", preset, "--output", str(output), "--set", "validation_images=0"]
    for item in [*sets, *extra]:
        command += ["--set", item]
    start = time.perf_counter()
    subprocess.run(command, check=True, capture_output=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - start
    metrics = json.loads((output / "metrics.json").read_text())
    return metrics["seconds"] / metrics["steps"], wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--set", action="append", default=[], dest="extra")
    parser.add_argument("--settings", default=",".join(SETTINGS))
    args = parser.parse_args()
    names = args.settings.split(",")
    load = os.getloadavg()[0]
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(args.rounds):
            for name in names:
                results[name].append(run_once(name, args.preset, args.extra, Path(folder)))
    print(f"cores: {os.cpu_count()}, 1-min load average before: {load:.1f}, after: {os.getloadavg()[0]:.1f}")
    print("| setting | s/step (median, min-max) | wall s (median) |")
    print("| --- | --- | --- |")
    for name in names:
        steps = [r[0] for r in results[name]]
        walls = [r[1] for r in results[name]]
        print(
            f"| {name} | {statistics.median(steps):.3f} ({min(steps):.3f}-{max(steps):.3f}) | "
            f"{statistics.median(walls):.1f} |"
        )


if __name__ == "__main__":
    main()
