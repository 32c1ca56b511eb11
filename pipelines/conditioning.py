"""Compose conditioning adapters (ControlNet, T2I-Adapter, IP-Adapter) with a loaded pipeline.

    pipe = load_pipeline("tiny-sd15"); load_adapter(pipe, "out/cat")            # personalization
    pipe = with_controlnet(pipe, "out/canny")                                    # a ControlNet pipeline
    with_ip_adapter(pipe, "out/ip/ip_adapter.safetensors", scale=0.6)
    pipe(prompt, image=edges, ip_adapter_image=reference)

The ControlNet / T2I-Adapter pipelines are stock diffusers pipelines built with `from_pipe`: they share
the UNet, VAE and text encoders (and so any adapter already loaded into them).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from personalize.errors import UserError

IP_ADAPTER_FILE = "ip_adapter.safetensors"


def _is_xl(pipe: Any) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None


def _folder(path: str | Path, what: str) -> Path:
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        raise UserError(f"{what} {folder} is not a model folder (no config.json); pass a trained run's output dir")
    return folder


def with_controlnet(pipe: Any, folder: str | Path) -> Any:
    """A (SDXL) ControlNet pipeline over `pipe`'s components with the ControlNetModel in `folder`."""
    import diffusers

    controlnet = diffusers.ControlNetModel.from_pretrained(str(_folder(folder, "--controlnet")), torch_dtype=pipe.dtype)
    name = "StableDiffusionXLControlNetPipeline" if _is_xl(pipe) else "StableDiffusionControlNetPipeline"
    return getattr(diffusers, name).from_pipe(pipe, controlnet=controlnet.to(pipe.device))


def with_t2i_adapter(pipe: Any, folder: str | Path) -> Any:
    """A (SDXL) T2I-Adapter pipeline over `pipe`'s components with the T2IAdapter in `folder`."""
    import diffusers

    adapter = diffusers.T2IAdapter.from_pretrained(str(_folder(folder, "--t2i-adapter")), torch_dtype=pipe.dtype)
    name = "StableDiffusionXLAdapterPipeline" if _is_xl(pipe) else "StableDiffusionAdapterPipeline"
    return getattr(diffusers, name).from_pipe(pipe, adapter=adapter.to(pipe.device))


def with_ip_adapter(pipe: Any, path: str | Path, scale: float = 1.0) -> Any:
    """Load an IP-Adapter file (or a run folder holding ip_adapter.safetensors) into `pipe`, in place.

    Its image encoder is read from `image_encoder/` beside the file (what `personalize train` writes)."""
    path = Path(path).expanduser()
    if path.is_dir():
        path = path / IP_ADAPTER_FILE
    if not path.is_file() or path.suffix != ".safetensors":
        raise UserError(f"--ip-adapter {path}: no such .safetensors file; pass a run's {IP_ADAPTER_FILE}")
    if not hasattr(pipe, "load_ip_adapter"):
        raise UserError(f"{type(pipe).__name__} cannot take an IP-Adapter; drop --ip-adapter or the other adapter")
    if getattr(pipe, "image_encoder", None) is None and not (path.parent / "image_encoder" / "config.json").is_file():
        raise UserError(f"--ip-adapter {path}: no image_encoder/ folder beside it; keep the run's folder together")
    pipe.load_ip_adapter(str(path.parent), subfolder="", weight_name=path.name, image_encoder_folder="image_encoder")
    pipe.set_ip_adapter_scale(scale)
    return pipe


def _image(path: str, flag: str) -> Any:
    from PIL import Image

    try:
        with Image.open(Path(path).expanduser()) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as error:
        raise UserError(f"{flag} {path}: cannot read the image ({error}); pass a PNG or JPEG") from None


def compose(
    pipe: Any,
    *,
    controlnet: str = "",
    control_image: str = "",
    control_scale: float = 1.0,
    t2i_adapter: str = "",
    adapter_image: str = "",
    adapter_scale: float = 1.0,
    ip_adapter: str = "",
    ip_image: str = "",
    ip_scale: float = 1.0,
) -> tuple[Any, dict[str, Any]]:
    """(pipeline, extra call arguments) for the given conditioning adapters; checks that each has its image."""
    pairs = [
        ("--controlnet", controlnet, "--control-image", control_image),
        ("--t2i-adapter", t2i_adapter, "--adapter-image", adapter_image),
        ("--ip-adapter", ip_adapter, "--ip-image", ip_image),
    ]
    for flag, value, image_flag, image in pairs:
        if image_flag == "--control-image" and image and not value and not t2i_adapter:
            continue  # a ControlNeXt adapter loaded with --adapter takes the control image (below)
        if bool(value) != bool(image):
            given, missing = (flag, image_flag) if value else (image_flag, flag)
            raise UserError(f"{given} needs {missing} too")
    if controlnet and t2i_adapter:
        raise UserError("--controlnet and --t2i-adapter cannot be combined in one diffusers pipeline; pick one")
    arguments: dict[str, Any] = {}
    if controlnet:
        pipe = with_controlnet(pipe, controlnet)
        arguments.update(image=_image(control_image, "--control-image"), controlnet_conditioning_scale=control_scale)
    if control_image and not controlnet:
        from personalize.pipelines.controlnext import set_control_image

        set_control_image(pipe, _image(control_image, "--control-image"), control_scale)
    if t2i_adapter:
        pipe = with_t2i_adapter(pipe, t2i_adapter)
        arguments.update(image=_image(adapter_image, "--adapter-image"), adapter_conditioning_scale=adapter_scale)
    if ip_adapter:
        with_ip_adapter(pipe, ip_adapter, ip_scale)
        arguments["ip_adapter_image"] = _image(ip_image, "--ip-image")
    return pipe, arguments


def add_flags(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("--controlnet", default="", metavar="DIR", help="a ControlNet folder (e.g. a controlnet run's output)")
    add(
        "--control-image",
        default="",
        metavar="IMG",
        help="the conditioning image (edges, ...) of --controlnet or of a ControlNeXt --adapter",
    )
    add("--control-scale", type=float, default=1.0, metavar="S", help="ControlNet/ControlNeXt strength (default 1.0)")
    add("--t2i-adapter", default="", metavar="DIR", help="a T2I-Adapter folder (e.g. a t2i-adapter run's output)")
    add("--adapter-image", default="", metavar="IMG", help="the T2I-Adapter's conditioning image")
    add("--adapter-scale", type=float, default=1.0, metavar="S", help="T2I-Adapter strength (default 1.0)")
    add("--ip-adapter", default="", metavar="FILE", help="an ip_adapter.safetensors (image_encoder/ beside it)")
    add("--ip-image", default="", metavar="IMG", help="the IP-Adapter's reference image")
    add("--ip-scale", type=float, default=1.0, metavar="S", help="IP-Adapter strength (default 1.0)")


def from_flags(pipe: Any, args: argparse.Namespace) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """(pipeline, call arguments, what the PNG metadata records) from the generate flags."""
    keys = ("controlnet", "control_image", "control_scale", "t2i_adapter", "adapter_image", "adapter_scale")
    keys += ("ip_adapter", "ip_image", "ip_scale")
    options = {key: getattr(args, key) for key in keys}
    pipe, arguments = compose(pipe, **options)
    used = {key: value for key, value in options.items() if value and not key.endswith("_scale")}
    record = {**used, **{key: options[key] for key in keys if key.endswith("_scale") and used}}
    return pipe, arguments, record
