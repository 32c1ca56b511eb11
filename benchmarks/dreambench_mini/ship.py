"""Copy the pretrained world model into the repository (~5 MB, float32): what `make demo` uses.

    python -m benchmarks.dreambench_mini.ship [--source benchmarks/.cache/dreambench-mini]
        [--target benchmarks/dreambench_mini/model]

Only the pipeline (safetensors and configs) and pretrain.json (its settings and the prompt-following
probes) are copied, and training_defaults.json (TRAINING_DEFAULTS: what a no-flags `personalize train` on
this base starts from, chosen by run.py's table; personalize.models.training_defaults) is written; the
training state pretrain.py continues from stays in the cache. Float32, not half precision: transformers
loads a text encoder in the dtype it was saved in, and CPU runs want float32.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Chosen by the table in benchmarks/results/dreambench_mini.md (2026-12-07): on this base LoRA at SD1.5's
# settings (lr 1e-4, 500 steps) never drew the subject, LoRA at lr 1e-3 drew it but also drifted the class
# prompts; full fine-tuning of the UNet at lr 1e-4 for 2000 steps put it into new contexts in 0.70 (ball)
# and 0.55 (box) of the images with no drift. 16 px images: buckets in steps of 16.
TRAINING_DEFAULTS = {
    "_why": "benchmarks/results/dreambench_mini.md: the no-flags setting that won on this base",
    "method": "full",
    "lr": 1e-4,
    "steps": 2000,
    "data": {"bucket_step": 16},
}


def main(argv: list[str] | None = None) -> None:
    from diffusers import StableDiffusionPipeline

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=ROOT / "benchmarks" / ".cache" / "dreambench-mini")
    parser.add_argument("--target", type=Path, default=ROOT / "benchmarks" / "dreambench_mini" / "model")
    args = parser.parse_args(argv)
    pipe = StableDiffusionPipeline.from_pretrained(args.source)
    if args.target.exists():
        shutil.rmtree(args.target)
    pipe.save_pretrained(args.target, safe_serialization=True)
    info = json.loads((args.source / "pretrain.json").read_text())
    (args.target / "pretrain.json").write_text(json.dumps(info, indent=1) + "\n")
    (args.target / "training_defaults.json").write_text(json.dumps(TRAINING_DEFAULTS, indent=1) + "\n")
    size = sum(path.stat().st_size for path in args.target.rglob("*") if path.is_file())
    print(f"wrote {args.target} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
