"""Samples of a finished conditioning run: the trained files loaded back into stock pipelines and used.

Each row of `samples/step-N.png` is one prompt: the conditioning (or reference) image of the first
training item, then `validation_images` images (seeds seed, seed+1, ...) generated with it. Loading
from the output dir (not the in-memory modules) checks the saved files on every run.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from personalize.images import make_grid, save_png

OPTIONS = {
    "controlnet": ("controlnet", "control_image"),
    "t2i-adapter": ("t2i_adapter", "adapter_image"),
    "ip-adapter": ("ip_adapter", "ip_image"),
    "controlnext": ("", "control_image"),  # loaded with load_adapter; compose gives it the control image
}


def to_image(tensor: torch.Tensor) -> Image.Image:
    """(3, H, W) in [0, 1] -> RGB PIL."""
    array = (tensor.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(array))


def write_samples(
    pipe: Any,
    config: Any,
    data: Any,
    output: Path,
    step: int,
    autocast: Callable[[], Any] | None = None,
    saved: Path | None = None,
) -> Path:
    """Generate with the side network saved in `saved` (default: the output dir); returns the grid's path."""
    from personalize.pipelines.conditioning import compose
    from personalize.pipelines.generate import GenerationSettings, generate

    item = data[(0, 0)]
    folder = output / "samples"
    condition = to_image(item[data.key])
    condition_path = save_png(condition, folder / f"{data.key}.png")
    target, image_option = OPTIONS[config.method]
    saved = saved or output
    source = saved / "ip_adapter.safetensors" if config.method == "ip-adapter" else saved
    if config.method == "controlnext":
        from personalize.pipelines import load_adapter

        loaded = load_adapter(pipe, saved, name="controlnext-sample")
        sampler, arguments = compose(pipe, control_image=str(condition_path))
    else:
        sampler, arguments = compose(pipe, **{target: str(source), image_option: str(condition_path)})
    prompts = config.validation_prompts or [item["prompt"]]
    size = config.data.resolution
    rows: list[Image.Image] = []
    try:
        for prompt in prompts:
            settings = GenerationSettings(
                prompt=prompt,
                steps=config.validation_steps,
                seed=config.seed,
                num_images=config.validation_images,
                width=size,
                height=size,
                extra=arguments,
            )
            with torch.no_grad(), autocast() if autocast is not None else nullcontext():  # a fresh one per use
                images = generate(sampler, settings)
            rows += [condition.resize(images[0].size), *images]
    finally:
        if config.method == "ip-adapter":
            sampler.unload_ip_adapter()
        if config.method == "controlnext":
            from personalize.pipelines import unload_adapter

            unload_adapter(pipe, loaded)
    grid = make_grid(rows, columns=config.validation_images + 1)
    info = {"prompt": " | ".join(prompts), "seed": config.seed, "steps": config.validation_steps, "training_step": step}
    return save_png(grid, folder / f"step-{step:06d}.png", info)
