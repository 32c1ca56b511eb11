"""Text-to-image generation with a stock diffusers pipeline, reproducible image by image.

Image i of a call uses seed `seed + i`, and that seed is written into its PNG, so any single
image can be regenerated on its own with `--seed <its seed> --num-images 1`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from personalize.errors import UserError
from personalize.images import make_grid, save_gif, save_png

# name -> (diffusers scheduler class, extra config); flow-matching models take only flow schedulers.
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),  # PLMS only, as SD ships it: any step count
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "dpm++": ("DPMSolverMultistepScheduler", {}),
    "dpm++-karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "flow-euler": ("FlowMatchEulerDiscreteScheduler", {}),
}
FLOW_SCHEDULERS = {"flow-euler"}


@dataclass
class GenerationSettings:
    prompt: str
    negative_prompt: str | None = None
    steps: int = 30
    guidance: float | None = None  # None: the pipeline's own default
    seed: int = 0
    num_images: int = 1
    width: int | None = None
    height: int | None = None
    scheduler: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def set_scheduler(pipe: Any, name: str) -> None:
    import diffusers

    if name not in SCHEDULERS:
        raise UserError(f"unknown scheduler '{name}'; choose one of: {', '.join(SCHEDULERS)}")
    is_flow = "FlowMatch" in type(pipe.scheduler).__name__
    if is_flow != (name in FLOW_SCHEDULERS):
        allowed = sorted(FLOW_SCHEDULERS) if is_flow else sorted(set(SCHEDULERS) - FLOW_SCHEDULERS)
        raise UserError(f"scheduler '{name}' does not fit this model; choose one of: {', '.join(allowed)}")
    class_name, overrides = SCHEDULERS[name]
    scheduler_class = getattr(diffusers, class_name)
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config, **overrides)


def _pipeline_call_arguments(pipe: Any, settings: GenerationSettings) -> dict[str, Any]:
    import inspect

    accepted = inspect.signature(pipe.__call__).parameters
    arguments: dict[str, Any] = {"prompt": settings.prompt, "num_inference_steps": settings.steps}
    optional = {
        "negative_prompt": settings.negative_prompt,
        "guidance_scale": settings.guidance,
        "width": settings.width,
        "height": settings.height,
    }
    for name, value in {**optional, **settings.extra}.items():
        if value is None:
            continue
        if name not in accepted:
            raise UserError(f"this pipeline ({type(pipe).__name__}) does not take '{name}'")
        arguments[name] = value
    if "max_area" in accepted and settings.width and settings.height:  # Flux Kontext: its area wins over the size
        arguments["max_area"] = settings.width * settings.height
        if "image" in arguments and "_auto_resize" in accepted:  # the source at the asked size, as in training
            arguments["_auto_resize"] = False
    return arguments


def generate(pipe: Any, settings: GenerationSettings) -> list[Any]:
    """Generate `settings.num_images` PIL images, image i from seed `settings.seed + i` (video pipelines:
    one list of frames per clip)."""
    import torch

    if settings.scheduler:
        set_scheduler(pipe, settings.scheduler)
    arguments = _pipeline_call_arguments(pipe, settings)
    device = getattr(pipe, "_execution_device", None) or pipe.device
    generator_device = "cpu" if torch.device(device).type == "mps" else device
    images = []
    for index in range(settings.num_images):
        generator = torch.Generator(generator_device).manual_seed(settings.seed + index)
        result = pipe(**arguments, generator=generator, output_type="pil")
        images.extend(result.frames if hasattr(result, "frames") else result.images)  # video: a list of frames each
    return images


def image_settings(pipe: Any, settings: GenerationSettings, index: int, model: str, **more: Any) -> dict[str, Any]:
    """What goes into image i's PNG metadata: enough to regenerate exactly that image."""
    scheduler = settings.scheduler or type(pipe.scheduler).__name__
    return {
        "prompt": settings.prompt,
        "negative_prompt": settings.negative_prompt,
        "steps": settings.steps,
        "guidance": settings.guidance,
        "seed": settings.seed + index,
        "scheduler": scheduler,
        "model": model,
        **more,
    }


def write_images(
    images: list[Any], output: str | Path, metadata: list[dict[str, Any]], grid: bool = True
) -> list[Path]:
    """Save images (a single `.png` path for one image, else a folder with a grid.png too). Clips (lists of
    frames, from video pipelines) are saved as animated GIFs at 16 fps (Wan's rate), one per clip."""
    output = Path(output)
    if images and isinstance(images[0], list):
        return _write_clips(images, output, metadata)
    if output.suffix.lower() == ".png":
        if len(images) != 1:
            raise UserError(f"--output {output} is one file but {len(images)} images were made; pass a folder")
        return [save_png(images[0], output, {**metadata[0], "width": images[0].width, "height": images[0].height})]
    paths = []
    for index, (image, settings) in enumerate(zip(images, metadata)):
        settings = {**settings, "width": image.width, "height": image.height}
        paths.append(save_png(image, output / f"{index:03d}_seed{settings['seed']}.png", settings))
    if grid and len(images) > 1:
        paths.append(save_png(make_grid(images), output / "grid.png"))
    return paths


def _write_clips(clips: list[list[Any]], output: Path, metadata: list[dict[str, Any]], fps: float = 16.0) -> list[Path]:
    """Each clip as `NNN_seedS.gif` in the folder `output` (or as `output` itself when it names one .gif)."""
    if output.suffix.lower() == ".gif":
        if len(clips) != 1:
            raise UserError(f"--output {output} is one file but {len(clips)} clips were made; pass a folder")
        return [save_gif(clips[0], output, fps, {**metadata[0], "frames": len(clips[0])})]
    if output.suffix:
        raise UserError(f"--output {output}: a video model writes .gif clips; pass a folder or a .gif file")
    return [
        save_gif(clip, output / f"{index:03d}_seed{settings['seed']}.gif", fps, {**settings, "frames": len(clip)})
        for index, (clip, settings) in enumerate(zip(clips, metadata))
    ]
