"""Validation sampling during and after training: prompts x seeds -> one grid per step in samples/
(video models: an animated GIF of grids, one per frame)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from personalize.images import make_grid, save_gif, save_png


def sample_grid(
    pipe: Any,
    prompts: list[str],
    folder: Path,
    step: int,
    *,
    seed: int = 0,
    images_per_prompt: int = 2,
    steps: int = 25,
    size: int | None = None,
    autocast: Callable[[], Any] | None = None,
    extra: dict[str, Any] | None = None,
    fps: float = 16.0,
) -> Path:
    """Generate `images_per_prompt` images per prompt (image i: seed + i) and save them as one grid.

    Rows are prompts, columns seeds; the PNG holds the prompts and seeds in its metadata. `extra`: more
    pipeline arguments (an edit model's source `image`; a video model's `num_frames`: its clips are saved
    as `step-N.gif` at `fps`, each frame a grid).
    """
    from personalize.pipelines.generate import GenerationSettings, generate

    images = []
    # The pipeline's own denoising bar, on a terminal only: a long end-of-run sampling shows progress.
    previous = dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.set_progress_bar_config(desc=f"samples at step {step}", leave=False, disable=None)
    try:
        for prompt in prompts:
            settings = GenerationSettings(
                prompt=prompt,
                steps=steps,
                seed=seed,
                num_images=images_per_prompt,
                width=size,
                height=size,
                extra=dict(extra or {}),
            )
            with torch.no_grad(), autocast() if autocast is not None else nullcontext():  # a fresh one per use
                images.extend(generate(pipe, settings))
    finally:
        pipe._progress_bar_config = previous
    info = {"prompt": " | ".join(prompts), "seed": seed, "steps": steps, "training_step": step}
    if isinstance(images[0], list):  # clips: lists of frames
        grids = [make_grid([clip[f] for clip in images], columns=images_per_prompt) for f in range(len(images[0]))]
        return save_gif(grids, Path(folder) / f"step-{step:06d}.gif", fps, info)
    grid = make_grid(images, columns=images_per_prompt)
    return save_png(grid, Path(folder) / f"step-{step:06d}.png", info)
