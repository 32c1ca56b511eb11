"""Run personalization methods through the mini DreamBench and write benchmarks/results/dreambench_mini.md.

    python -m benchmarks.dreambench_mini.run [--methods default,dora,...] [--subjects ball,box] [--seeds 4]
        [--repeats 1] [--peer-script PATH/train_dreambooth_lora.py --peer-python VENV/bin/python]

For each subject (world.SUBJECTS: objects the pretrained world model never saw) the five instance photos
are written to WORKDIR/photos/<subject>/; every method trains on them through `personalize train`
(the CLI, in process) with only the flags the method needs, on the pretrained `dreambench-mini` base;
diffusers' train_dreambooth_lora.py (its README's settings) trains in its own venv when given. Every
run is then drawn with the same code, seeds and settings (personalize.eval.generate_prompt, adapters
loaded by personalize.pipelines.load_adapter) and scored by measures.py. "no training" is the base itself.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.dreambench_mini import measures, world

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
PEER = "diffusers train_dreambooth_lora.py"
# What the world model needs whatever the method: its 16 px images (bucket sides in multiples of 16).
WORLD_FLAGS = ["--resolution", str(world.SIZE), "--set", f"data.bucket_step={world.SIZE}"]
METHODS: dict[str, list[str]] = {
    "default (no flags)": [],  # the base's training_defaults.json (ship.py): full fine-tuning, lr 1e-4, 2000 steps
    "lora": ["--method", "lora"],  # SD1.5's LoRA defaults: rank 16, lr 1e-4, 500 steps, attention
    "lora + text encoder": ["--method", "lora", "--train-text-encoder"],
    "dora": ["--method", "dora"],
    "loha": ["--method", "loha"],
    "lokr": ["--method", "lokr"],
    "krona": ["--method", "krona"],
    "pivotal": ["--method", "pivotal"],
    "lora lr 1e-3 1000 steps": ["--method", "lora", "--lr", "1e-3", "--steps", "1000"],
    "full at SD1.5 settings": ["--method", "full"],  # DreamBooth's lr 5e-6, 400 steps
    "full + prior preservation": ["--prior-preservation", "--class-images", "50"],  # the default + prior loss
    "full lr 2e-4 1000 steps": ["--method", "full", "--lr", "2e-4", "--steps", "1000"],
}
GUIDANCE = 4.0
STEPS = 20


def write_photos(workdir: Path, subject: str) -> Path:
    from PIL import Image

    folder = workdir / "photos" / subject
    folder.mkdir(parents=True, exist_ok=True)
    for index, photo in enumerate(world.subject_images(subject, count=5)):
        Image.fromarray(photo).save(folder / f"{subject}-{index}.png")
    return folder


def train_ours(
    name: str, flags: list[str], photos: Path, out: Path, model: str, seed: int, workdir: Path, steps: int | None = None
) -> float:
    from personalize.cli import main

    argv = ["train", "--images", str(photos), "--model", model, "--token", "sks", "--class-word", photos.name]
    argv += ["--steps", str(steps)] if steps else []
    argv += ["--overwrite"]  # a rerun of the benchmark replaces its own earlier run
    argv += [*WORLD_FLAGS, *flags, "--output", str(out), "--seed", str(seed), "--checkpoint-every", "0"]
    argv += ["--set", "validation_images=0", "--set", f"data.cache_dir={workdir / 'cache'}"]
    start = time.perf_counter()
    if main(argv) != 0:
        raise SystemExit(f"{name}: personalize train failed ({' '.join(argv)})")
    return time.perf_counter() - start


def train_peer(args: argparse.Namespace, photos: Path, out: Path, model: str, seed: int) -> float:
    """diffusers' DreamBooth-LoRA script at its README's settings (lr 1e-4, 500 steps, batch 1, rank 4)."""
    argv = [
        args.peer_python,
        str(args.peer_script),
        f"--pretrained_model_name_or_path={model}",
        f"--instance_data_dir={photos}",
        f"--instance_prompt=a photo of sks {photos.name}",
        f"--output_dir={out}",
        f"--resolution={world.SIZE}",
        "--train_batch_size=1",
        "--gradient_accumulation_steps=1",
        "--checkpointing_steps=100000",
        "--learning_rate=1e-4",
        "--lr_scheduler=constant",
        "--lr_warmup_steps=0",
        f"--max_train_steps={args.steps or 500}",
        f"--seed={seed}",
        "--mixed_precision=no",
        "--dataloader_num_workers=0",
    ]
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env={"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        raise SystemExit(f"{PEER} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - start


def run_token(run_dir: Path) -> str:
    """The trigger token a run trained (pivotal picks its own, e.g. <ball>); the peer's is sks."""
    import yaml

    config = run_dir / "config.yaml"
    return yaml.safe_load(config.read_text())["data"]["token"] if config.is_file() else "sks"


def draw(pipe: Any, adapter: Path | None, subject: str, token: str, seeds: int) -> dict[str, Any]:
    """Subject and class images of one run (adapter) or of the base (None), as uint8 arrays."""
    from personalize.eval.run import EvalSettings, generate_prompt
    from personalize.pipelines import load_adapter, unload_adapter

    settings = EvalSettings(seeds=seeds, steps=STEPS, guidance=GUIDANCE, seed=1000)
    subject_prompts, class_prompts = measures.subject_prompts(token, subject), measures.class_prompts(subject)
    name = load_adapter(pipe, adapter, name="bench") if adapter is not None else None
    try:
        texts = [prompt.text for prompt in subject_prompts] + [prompt.text for prompt in class_prompts]
        images = {
            text: [np.asarray(image) for image in generate_prompt(pipe, text, settings, world.SIZE)] for text in texts
        }
    finally:
        if name:
            unload_adapter(pipe, name)
    figures = measures.score_subject(images, subject_prompts, subject)
    figures["class_accuracy"] = measures.class_accuracy(images, class_prompts)
    return {"figures": figures, "images": images, "prompts": texts}


def sheet(images: dict[str, list[np.ndarray]], texts: list[str], path: Path) -> None:
    """Rows: prompts; columns: seeds; 6x nearest-neighbour so the 16 px images can be seen."""
    from PIL import Image

    rows = [np.concatenate(images[text], axis=1) for text in texts]
    grid = np.concatenate(rows, axis=0)
    Image.fromarray(grid).resize((grid.shape[1] * 6, grid.shape[0] * 6), Image.Resampling.NEAREST).save(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated names of METHODS")
    parser.add_argument("--subjects", default=",".join(world.SUBJECTS))
    parser.add_argument("--seeds", type=int, default=4, help="images per prompt")
    parser.add_argument("--repeats", type=int, default=1, help="training seeds per method (noise)")
    parser.add_argument("--workdir", type=Path, default=ROOT / "benchmarks" / ".cache" / "dreambench")
    parser.add_argument("--peer-script", type=Path, default=None)
    parser.add_argument("--peer-python", default=sys.executable)
    parser.add_argument("--output", type=Path, default=RESULTS / "dreambench_mini.json")
    parser.add_argument("--steps", type=int, default=None, help="override every method's steps (quick checks only)")
    args = parser.parse_args(argv)
    import torch

    from personalize.models import load_pipeline
    from personalize.models.world import world_model_folder

    torch.set_num_threads(1)
    model = str(world_model_folder())
    pipe = load_pipeline(model)
    pipe.set_progress_bar_config(disable=True)
    methods = [name for name in args.methods.split(",") if name]
    unknown = [name for name in methods if name not in METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    results: dict[str, Any] = json.loads(args.output.read_text()) if args.output.is_file() else {}
    results["calibration"] = {subject: measures.calibrate(subject) for subject in args.subjects.split(",")}
    pretrain_info = Path(model) / "pretrain.json"
    if pretrain_info.is_file():  # how the base was made, and its prompt following while it pretrained
        results["pretrain"] = json.loads(pretrain_info.read_text())
    sheets = args.workdir / "sheets"
    sheets.mkdir(parents=True, exist_ok=True)
    runs = results.setdefault("runs", {})
    for subject in args.subjects.split(","):
        photos = write_photos(args.workdir, subject)
        base = draw(pipe, None, subject, "sks", args.seeds)
        runs.setdefault("no training", {})[subject] = [{**base["figures"], "seconds": 0.0}]
        sheet(base["images"], base["prompts"], sheets / f"no-training-{subject}.png")
        print(f"{subject} no training: {base['figures']}", flush=True)
        todo = [(name, "ours") for name in methods] + ([(PEER, "peer")] if args.peer_script else [])
        for name, kind in todo:
            entries = []
            for seed in range(args.repeats):
                out = args.workdir / "runs" / name.replace(" ", "_").replace("+", "") / f"{subject}-{seed}"
                if kind == "ours":
                    seconds = train_ours(name, METHODS[name], photos, out, model, seed, args.workdir, args.steps)
                else:
                    seconds = train_peer(args, photos, out, model, seed)
                drawn = draw(pipe, out, subject, run_token(out), args.seeds)
                entries.append({**drawn["figures"], "seconds": seconds})
                if seed == 0:
                    sheet(drawn["images"], drawn["prompts"], sheets / f"{out.parent.name}-{subject}.png")
                print(f"{subject} {name} seed {seed}: {entries[-1]}", flush=True)
            runs.setdefault(name, {})[subject] = entries
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.write_text(json.dumps(results, indent=1))  # after every method: a cut run keeps its figures
    from benchmarks.dreambench_mini.report import write_report

    write_report(results, args.output.with_suffix(".md"))


if __name__ == "__main__":
    main()
