"""Copy the pretrained world model into the repository at half precision (~2.5 MB): what `make demo` uses.

    python -m benchmarks.dreambench_mini.ship [--source benchmarks/.cache/dreambench-mini]
        [--target benchmarks/dreambench_mini/model]

Loaders cast it back to float32 (`load_pipeline(..., torch_dtype=torch.float32)`; the trainers do so
themselves): the fp16 rounding changes a generated image by less than one 8-bit level in our checks.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def main(argv: list[str] | None = None) -> None:
    import torch
    from diffusers import StableDiffusionPipeline

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=ROOT / "benchmarks" / ".cache" / "dreambench-mini")
    parser.add_argument("--target", type=Path, default=ROOT / "benchmarks" / "dreambench_mini" / "model")
    args = parser.parse_args(argv)
    pipe = StableDiffusionPipeline.from_pretrained(args.source, torch_dtype=torch.float16)
    if args.target.exists():
        shutil.rmtree(args.target)
    pipe.save_pretrained(args.target, safe_serialization=True)
    info = json.loads((args.source / "pretrain.json").read_text())
    (args.target / "pretrain.json").write_text(json.dumps({**info, "dtype": "float16"}, indent=2) + "\n")
    size = sum(path.stat().st_size for path in args.target.rglob("*") if path.is_file())
    print(f"wrote {args.target} ({size / 1e6:.1f} MB)")


if __name__ == "__main__":
    main()
