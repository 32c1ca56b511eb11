"""`personalize batch` against separate `personalize train` runs: 6 subjects on tiny-sd15 with prior preservation.

Subjects: 3 cats and 3 dogs made from examples/cat (3 images each: crops, mirror images and color shifts of
the five photos, a different set per subject), so that prior preservation has two class words. Every
mode trains the same 6 jobs with the same settings (the `tiny` preset + --prior-preservation
--class-images N), each mode from an empty cache (PERSONALIZE_CACHE in a fresh folder):

- separate: 6 `personalize train` processes one after another (each loads the base, generates its class
  images into its own output folder, builds its caches);
- batch, 1 worker / 2 workers: `personalize batch jobs.yaml --workers N`;
- batch on Ray: `personalize batch jobs.yaml --backend ray` (a local Ray cluster started by the run).

Per mode: wall time of the whole command, and the phases summed over the 6 jobs from each job's
metrics.json / batch.json (startup = wall time not spent in any job phase: interpreter, imports, workers,
Ray). The adapters of every mode are compared with the separate runs' (largest absolute difference).

    python -m benchmarks.batch                      # 2 repeats, 8 class images
    python -m benchmarks.batch --repeats 3 --class-images 8 --modes separate batch1
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

ROOT = Path(__file__).resolve().parents[1]
CAT = ROOT / "examples" / "cat"
SUBJECTS = ["ohwx_cat", "zwx_cat", "qrt_cat", "vbn_dog", "plm_dog", "kjh_dog"]
MODES = {
    "separate": "6 x personalize train",
    "batch1": "personalize batch --workers 1",
    "batch2": "personalize batch --workers 2",
    "ray": "personalize batch --backend ray",
}
PHASES = ["startup", "load", "class images", "caches", "training", "saving"]
ADAPTER = "pytorch_lora_weights.safetensors"


def variant(image: Image.Image, index: int) -> Image.Image:
    """A different picture of the 'same subject': crop window, mirror and a color shift chosen by index."""
    width, height = image.size
    rng = np.random.default_rng(index)
    left, top = int(rng.integers(0, width // 5)), int(rng.integers(0, height // 5))
    picture = image.crop((left, top, left + width * 4 // 5, top + height * 4 // 5))
    if index % 2:
        picture = ImageOps.mirror(picture)
    shift = rng.integers(-25, 26, size=3)
    array = np.clip(np.asarray(picture, dtype=np.int16) + shift, 0, 255).astype(np.uint8)
    return Image.fromarray(array)


def make_photos(folder: Path) -> Path:
    photos = sorted(CAT.glob("*.jpg"))
    for number, name in enumerate(SUBJECTS):
        (folder / name).mkdir(parents=True, exist_ok=True)
        for image_number in range(3):
            index = number * 3 + image_number
            with Image.open(photos[index % len(photos)]) as image:
                variant(image.convert("RGB"), index).save(folder / name / f"{index:02d}.jpg", quality=92)
    return folder


def job_file(folder: Path, class_images: int) -> Path:
    text = f"preset: tiny\nprior_preservation: true\nclass_images: {class_images}\njobs:\n  - images: photos/*\n"
    path = folder / "jobs.yaml"
    path.write_text(text)
    return path


def run_command(command: list[str], cache: Path) -> float:
    # One thread per process in every mode: on a busy 2-core machine two spin-waiting OpenMP threads make
    # each step many times slower (see the Makefile's demo target), which would swamp what is compared.
    env = {**os.environ, "PERSONALIZE_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def phase_sums(phases: list[dict[str, float]], wall: float) -> dict[str, float]:
    """The recipe's phase names -> the table's columns, summed over jobs."""
    total = dict.fromkeys(PHASES, 0.0)
    for job in phases:
        total["load"] += job.get("load", 0.0)
        total["class images"] += job.get("class_images", 0.0) + job.get("data", 0.0)  # data: scan + class images
        total["caches"] += job.get("cache", 0.0)
        total["training"] += job.get("setup", 0.0) + job.get("train", 0.0)
        total["saving"] += job.get("save", 0.0) + job.get("eval", 0.0)
    total["startup"] = max(0.0, wall - sum(total.values()))
    return total


def run_mode(mode: str, work: Path, spec: Path, class_images: int) -> tuple[float, dict[str, float], Path]:
    cache = work / "cache"
    out = work / "out"
    personalize = str(Path(sys.executable).with_name("personalize"))
    if mode == "separate":
        wall = 0.0
        for name in SUBJECTS:
            command = [personalize, "train", "--images", str(spec.parent / "photos" / name), "--preset", "tiny"]
            command += ["--prior-preservation", "--class-images", str(class_images), "--output", str(out / name)]
            wall += run_command(command, cache)
        phases = [json.loads((out / name / "metrics.json").read_text()).get("phases", {}) for name in SUBJECTS]
        return wall, phase_sums(phases, wall), out
    command = [personalize, "batch", str(spec), "--output", str(out)]
    command += ["--backend", "ray"] if mode == "ray" else ["--workers", mode[-1]]
    wall = run_command(command, cache)
    summary = json.loads((out / "batch.json").read_text())
    assert all(job["status"] == "done" for job in summary["jobs"]), summary["jobs"]
    phases = phase_sums([job["phases"] for job in summary["jobs"]], wall)
    if mode != "batch1":  # jobs ran side by side: the phase sums exceed the wall time; no startup figure
        phases["startup"] = float("nan")
    return wall, phases, out


def largest_difference(out: Path, reference: Path) -> float:
    from safetensors.torch import load_file

    worst = 0.0
    for name in SUBJECTS:
        mine, theirs = load_file(str(out / name / ADAPTER)), load_file(str(reference / name / ADAPTER))
        worst = max(worst, max(float((mine[key] - theirs[key]).abs().max()) for key in theirs))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--class-images", type=int, default=8)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="personalize-bench-batch-") as tmp:
        base = Path(tmp)
        make_photos(base / "photos")
        spec = job_file(base, args.class_images)
        for repeat in range(args.repeats):
            reference = None
            for mode in args.modes:
                work = base / f"{mode}-{repeat}"
                wall, phases, out = run_mode(mode, work, spec, args.class_images)
                if reference is None:
                    reference = out
                difference = largest_difference(out, reference)
                rows.append((repeat + 1, mode, wall, phases, difference))
                cells = " ".join(f"{key} {value:6.1f}" for key, value in phases.items())
                print(
                    f"run {repeat + 1} {MODES[mode]:34s} {wall:7.1f} s  {cells}  max |dW - ref| {difference:.1e}",
                    flush=True,
                )
            for mode in args.modes:
                shutil.rmtree(base / f"{mode}-{repeat}", ignore_errors=True)
    separate = {repeat: wall for repeat, mode, wall, _, _ in rows if mode == "separate"}
    print("\n| run | mode | wall (s) | vs separate | " + " | ".join(PHASES) + " | max abs diff of the adapters |")
    print("|---|---|---|---|" + "---|" * len(PHASES) + "---|")
    for repeat, mode, wall, phases, difference in rows:
        ratio = f"{wall / separate[repeat]:.2f}x" if repeat in separate else "-"
        cells = " | ".join("-" if value != value else f"{value:.1f}" for value in phases.values())
        print(f"| {repeat} | {MODES[mode]} | {wall:.1f} | {ratio} | {cells} | {difference:.1e} |")


if __name__ == "__main__":
    main()
