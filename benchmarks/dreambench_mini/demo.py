"""`make demo`, second half: the demo run drawn before and after training, on the pretrained world model.

    python -m benchmarks.dreambench_mini.demo RUN_DIR [--subject ball] [--seeds 4] [--grid PATH]

RUN_DIR is a `personalize train --model dreambench-mini` run on a subject's photos (`make demo`:
examples/ball, the yellow-over-purple ball the world never contained). The same prompts and seeds are drawn
with the base alone ("before") and with the run's adapter ("after"); the grid shows them side by side
(rows: the prompts, which put the subject into contexts its photos never showed, then class prompts)
and measures.py's figures are printed: the subject appears where the prompt put it, and class prompts
still draw the class.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from benchmarks.dreambench_mini import run, world

SCALE = 6  # 16 px images, enlarged without smoothing so the pixels stay readable
LABEL_WIDTH = 150


def before_after_grid(before: dict, after: dict, photos: list[np.ndarray], path: Path) -> Path:
    """Rows: the instance photos, then each prompt; left half before training, right half after."""
    from PIL import Image, ImageDraw

    cell = world.SIZE * SCALE
    seeds = len(next(iter(before["images"].values())))
    gap = cell // 2
    width = LABEL_WIDTH + 2 * seeds * cell + gap
    rows = [("training photos", photos[:seeds], photos[:0])]
    rows += [(text, before["images"][text], after["images"][text]) for text in before["prompts"]]
    header = 18
    canvas = Image.new("RGB", (width, header + len(rows) * cell), "white")
    pen = ImageDraw.Draw(canvas)
    pen.text((LABEL_WIDTH, 2), "before: the base alone", fill="black")
    pen.text((LABEL_WIDTH + seeds * cell + gap, 2), "after: base + the demo adapter", fill="black")

    def paste(image: np.ndarray, x: int, y: int) -> None:
        canvas.paste(Image.fromarray(image).resize((cell, cell), Image.Resampling.NEAREST), (x, y))

    for row, (text, left, right) in enumerate(rows):
        y = header + row * cell
        pen.text((4, y + cell // 2 - 6), text.replace("a photo of ", ""), fill="black")
        for column, image in enumerate(left):
            paste(image, LABEL_WIDTH + column * cell, y)
        for column, image in enumerate(right):
            paste(image, LABEL_WIDTH + seeds * cell + gap + column * cell, y)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def figures_table(before: dict[str, float], after: dict[str, float]) -> str:
    rows = [
        ("subject in new contexts", "in_context"),
        ("subject fidelity", "subject"),
        ("prompt fidelity (context)", "prompt"),
        ("class accuracy", "class_accuracy"),
    ]
    lines = [f"{'':28s}{'before':>8s}{'after':>8s}"]
    lines += [f"{label:28s}{before[key]:8.2f}{after[key]:8.2f}" for label, key in rows]
    lines.append(
        f"{'drift (class accuracy lost)':28s}{'':8s}{before['class_accuracy'] - after['class_accuracy']:+8.2f}"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--subject", default="ball", choices=list(world.SUBJECTS))
    parser.add_argument("--seeds", type=int, default=4, help="images per prompt")
    parser.add_argument(
        "--grid", type=Path, default=None, help="where to write the grid (default RUN_DIR/before_after.png)"
    )
    args = parser.parse_args(argv)
    import torch

    from personalize.models import load_pipeline

    # One thread, as `personalize train` picks for a small model: on a busy CPU, more threads wait on each other.
    torch.set_num_threads(1)
    pipe = load_pipeline("dreambench-mini")
    pipe.set_progress_bar_config(disable=True)
    token = run.run_token(args.run_dir)
    before = run.draw(pipe, None, args.subject, token, args.seeds)
    after = run.draw(pipe, args.run_dir, args.subject, token, args.seeds)
    grid = args.grid or args.run_dir / "before_after.png"
    before_after_grid(before, after, world.subject_images(args.subject, count=args.seeds), grid)
    print(figures_table(before["figures"], after["figures"]))
    print(f"before/after grid: {grid}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
