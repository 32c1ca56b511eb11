"""README.md of a ControlNet / T2I-Adapter / IP-Adapter run: what it is, how to load it, its settings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

PIPELINES = {
    ("controlnet", False): "StableDiffusionControlNetPipeline",
    ("controlnet", True): "StableDiffusionXLControlNetPipeline",
    ("t2i-adapter", False): "StableDiffusionAdapterPipeline",
    ("t2i-adapter", True): "StableDiffusionXLAdapterPipeline",
}


def usage(method: str, family: str, base_model: str, output: Path) -> str:
    """A loading snippet with stock diffusers classes only (ControlNeXt: stock pipeline + our loader)."""
    if method == "controlnext":
        pipeline = "StableDiffusionXLPipeline" if family == "sdxl" else "StableDiffusionPipeline"
        return (
            f"from diffusers import {pipeline}\nfrom diffusers.utils import load_image\n"
            "from personalize.pipelines import load_adapter, set_control_image\n\n"
            f'pipe = {pipeline}.from_pretrained("{base_model}")\n'
            f'load_adapter(pipe, "{output}")\n'
            'set_control_image(pipe, load_image("conditioning.png"))\n'
            'image = pipe("a photo").images[0]\n'
        )
    if method == "ip-adapter":
        pipeline = "StableDiffusionXLPipeline" if family == "sdxl" else "StableDiffusionPipeline"
        return (
            f"from diffusers import {pipeline}\nfrom diffusers.utils import load_image\n\n"
            f'pipe = {pipeline}.from_pretrained("{base_model}")\n'
            f'pipe.load_ip_adapter("{output}", subfolder="", weight_name="ip_adapter.safetensors")\n'
            "pipe.set_ip_adapter_scale(0.6)\n"
            'image = pipe("a photo", ip_adapter_image=load_image("reference.png")).images[0]\n'
        )
    model_class = "ControlNetModel" if method == "controlnet" else "T2IAdapter"
    argument = "controlnet" if method == "controlnet" else "adapter"
    image_argument = "image"
    pipeline = PIPELINES[(method, family == "sdxl")]
    return (
        f"from diffusers import {model_class}, {pipeline}\nfrom diffusers.utils import load_image\n\n"
        f'{argument} = {model_class}.from_pretrained("{output}")\n'
        f'pipe = {pipeline}.from_pretrained("{base_model}", {argument}={argument})\n'
        f'image = pipe("a photo", {image_argument}=load_image("conditioning.png")).images[0]\n'
    )


def cli_usage(method: str, output: Path) -> str:
    if method == "controlnext":
        return f'personalize generate --model BASE --prompt "..." --adapter {output} --control-image IMAGE.png'
    flag = {"controlnet": "--controlnet", "t2i-adapter": "--t2i-adapter", "ip-adapter": "--ip-adapter"}[method]
    image = {"controlnet": "--control-image", "t2i-adapter": "--adapter-image", "ip-adapter": "--ip-image"}[method]
    target = output / "ip_adapter.safetensors" if method == "ip-adapter" else output
    return f'personalize generate --model BASE --prompt "..." {flag} {target} {image} IMAGE.png'


def render_card(
    config: Any, family: str, files: list[Path], output: Path, metrics: dict[str, Any], sample: Path | None = None
) -> str:
    cond = config.conditioning
    if config.method == "ip-adapter":
        source = f"reference images from {cond.reference}" if cond.reference else "each image as its own reference"
    else:
        source = f"conditioning images from {cond.folder}" if cond.folder else f"the {cond.annotator} annotator"
    settings = {
        "steps": config.steps,
        "lr": config.lr,
        "batch_size": config.batch_size,
        "grad_accum": config.grad_accum,
        "resolution": config.data.resolution,
        "prompt_dropout": cond.prompt_dropout,
        "seed": config.seed,
    }
    if config.method == "controlnet" and cond.controlnet_adapter:
        settings["controlnet_adapter"] = cond.controlnet_adapter
    if config.method == "t2i-adapter":
        settings["t2i_variant"] = cond.t2i_variant
    if config.method == "ip-adapter":
        settings["image_dropout"] = cond.image_dropout
    if config.method == "controlnext":
        settings["controlnext_scale"] = cond.controlnext_scale
        settings["controlnext_unet"] = f"`{cond.controlnext_unet}`"
    rows = "\n".join(f"| {key} | {value} |" for key, value in settings.items())
    names = "\n".join(f"- `{path.relative_to(output) if path.is_relative_to(output) else path}`" for path in files)
    return (
        f"# {config.method} for {config.model}\n\n"
        f"A {config.method} trained with `personalize train` on {config.data.images} ({family}), "
        f"paired with {source}.\n\n"
        + (
            f"![samples]({sample.relative_to(output)})\n\nEach row: the first training image's "
            f"{'reference' if config.method == 'ip-adapter' else 'conditioning'} image, then images generated "
            "with it by the saved files.\n\n"
            if sample is not None
            else ""
        )
        + f"## Use it\n\n```bash\n{cli_usage(config.method, output)}\n```\n\n"
        f"```python\n{usage(config.method, family, config.model, output)}```\n\n"
        f"## Settings\n\n| key | value |\n| --- | --- |\n{rows}\n\n"
        f"Final loss {metrics['final_loss']:.4f} after {metrics['steps']} steps "
        f"({metrics['trainable_params']:,} trainable parameters).\n\n## Files\n\n{names}\n"
    )
