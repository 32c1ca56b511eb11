"""`personalize generate`: images from a base model, written with their reproduction settings."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from personalize.errors import UserError

# = personalize.adapters.QUANT_MODES, spelled out so that `personalize --help` does not import torch.
QUANTIZE_CHOICES = ("nf4", "fp4", "int8")


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="generate images with a diffusion model, or text with a language model",
        description="Generate images with a diffusion model and write them (plus a grid) as PNGs whose "
        "metadata holds the prompt, seed and settings that reproduce them. With a language model "
        "(tiny-llama, tiny-llava, a transformers folder or --max-new-tokens), stream the answer to the terminal.",
    )
    parser.add_argument("--model", required=True, help="hub id, diffusers folder, .safetensors file, or tiny-sd15")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--negative-prompt", default=None)
    parser.add_argument("--steps", type=int, default=30, help="denoising steps (default 30)")
    parser.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed+i")
    parser.add_argument("--num-images", type=int, default=1)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument(
        "--num-frames", type=int, default=None, help="video models: frames per clip, saved as a GIF (Wan: 4k + 1)"
    )
    parser.add_argument("--scheduler", default=None, help="ddim, euler, euler-a, dpm++, unipc, flow-euler, ...")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    parser.add_argument("--dtype", default="auto", choices=["auto", "fp32", "fp16", "bf16"])
    parser.add_argument(
        "--adapter",
        action="append",
        default=[],
        metavar="PATH[:SCALE]",
        help="a run's output dir or an adapter file (diffusers, kohya/LyCORIS, embeddings), at SCALE "
        "(default 1.0); repeat to stack adapters",
    )
    parser.add_argument(
        "--quantize", choices=QUANTIZE_CHOICES, default=None, help="quantize the UNet/transformer (bitsandbytes)"
    )
    parser.add_argument("--allow-pickle", action="store_true", help="allow loading .ckpt/.pt (pickle) files")
    parser.add_argument("--output", default="personalize-out/generated", help="a folder, or a .png for one image")
    text = parser.add_argument_group("language models")
    text.add_argument("--max-new-tokens", type=int, default=None, help="tokens to generate (default 128)")
    text.add_argument("--temperature", type=float, default=None, help="sample at this temperature (default: greedy)")
    text.add_argument(
        "--image",
        default=None,
        help="VLM: an image the prompt talks about; edit models (Flux Kontext, ...): the image to edit",
    )
    from personalize.pipelines.conditioning import add_flags

    add_flags(parser)  # --controlnet / --t2i-adapter / --ip-adapter and their images
    parser.set_defaults(run=run)


def parse_adapter(spec: str) -> tuple[str, float]:
    """ "out/cat:0.6" -> ("out/cat", 0.6); "out/cat" -> ("out/cat", 1.0). A path that exists as given wins
    (so a file named "a:1" still loads)."""
    path, colon, scale = spec.rpartition(":")
    if not colon or not path or Path(spec).exists():
        return spec, 1.0
    try:
        return path, float(scale)
    except ValueError:
        return spec, 1.0


def _quantize_denoiser(pipe: Any, mode: str, compute_dtype: Any, device: Any) -> None:
    """A UNet in 4 bits with its convolutions (adapters.quantize_unet); a transformer's Linear layers."""
    from personalize import adapters
    from personalize.models.mapped import tensor_reader
    from personalize.pipelines.components import denoiser

    model = denoiser(pipe)
    if getattr(pipe, "unet", None) is model:
        adapters.quantize_unet(model, mode, compute_dtype, read_weight=tensor_reader(model), device=device)
    else:
        adapters.quantize(model, mode, compute_dtype=compute_dtype, read_weight=tensor_reader(model), device=device)


def _check(args: argparse.Namespace) -> None:
    for name in ("steps", "num_images"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(args, name)})")
    for name in ("width", "height"):
        value = getattr(args, name)
        if value is not None and (value < 8 or value % 8):
            raise UserError(f"--{name} must be a positive multiple of 8 (got {value})")
    if args.output.lower().endswith(".png") and args.num_images > 1:
        raise UserError(f"--output {args.output} is one file but --num-images is {args.num_images}; pass a folder")


def resolve_device(device: str) -> str:
    import torch

    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_dtype(dtype: str, device: str) -> Any:
    import torch

    if dtype == "auto":
        return torch.float16 if device.startswith(("cuda", "mps")) else torch.float32
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]


def _is_text(args: argparse.Namespace) -> bool:
    from pathlib import Path

    from personalize.pipelines.text import language_family

    # a peft folder, or personalize's own file (only the LLM recipe writes it): a language model's adapter
    files = ("adapter_config.json", "personalize_adapter.safetensors")
    peft_adapter = any((Path(spec).expanduser() / name).is_file() for spec in args.adapter for name in files)
    return language_family(args.model) is not None or args.max_new_tokens is not None or peft_adapter


def run_text(args: argparse.Namespace) -> int:
    from personalize.pipelines.text import generate_text, load_text_model, read_image

    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be at least 1 (got {args.max_new_tokens})")
    if len(args.adapter) > 1:
        raise UserError("a language model takes one --adapter folder (peft layout); stacking is for diffusion models")
    device = resolve_device(args.device)
    dtype = None if args.dtype == "auto" else resolve_dtype(args.dtype, device)
    adapter = args.adapter[0] if args.adapter else None
    model, processor = load_text_model(args.model, adapter, dtype=dtype, device=device)
    image = read_image(args.image) if args.image else None
    generate_text(
        model,
        processor,
        args.prompt,
        max_new_tokens=args.max_new_tokens or 128,
        temperature=args.temperature,
        seed=args.seed,
        image=image,
        stream=True,
    )
    return 0


def load_adapters(pipe: Any, specs: list[str], allow_pickle: bool) -> list[dict[str, Any]]:
    """Load every --adapter; returns what the PNG metadata records: [{"path", "scale", "name"}]."""
    from personalize.pipelines import load_adapter

    loaded = []
    for spec in specs:
        path, scale = parse_adapter(spec)
        name = load_adapter(pipe, path, scale=scale, allow_pickle=allow_pickle)
        loaded.append({"path": path, "scale": scale, "name": name})
    return loaded


def _source_image(pipe: Any, path: str) -> Any:
    """The --image of an edit model (a pipeline whose call takes `image`), decoded as training images are."""
    import inspect

    from personalize.pipelines.text import read_image

    if "image" not in inspect.signature(pipe.__call__).parameters:
        raise UserError(
            f"--image needs an edit model (Flux Kontext, ...); {type(pipe).__name__} does not take a source image"
        )
    return read_image(path)


def run(args: argparse.Namespace) -> int:
    from personalize.models import load_pipeline

    if _is_text(args):
        return run_text(args)
    from personalize.pipelines.generate import GenerationSettings, generate, image_settings, write_images

    _check(args)
    device = resolve_device(args.device)
    pipe = load_pipeline(args.model, torch_dtype=resolve_dtype(args.dtype, device), allow_pickle=args.allow_pickle)
    if args.quantize:  # layer by layer on the device: the full-precision denoiser never sits there whole
        _quantize_denoiser(pipe, args.quantize, resolve_dtype(args.dtype, device), device)
    pipe.to(device)
    adapters = load_adapters(pipe, args.adapter, args.allow_pickle)
    from personalize.pipelines.conditioning import from_flags

    pipe, call_arguments, conditioning = from_flags(pipe, args)
    if args.image:  # an edit model edits this image as the prompt says
        call_arguments["image"] = _source_image(pipe, args.image)
        conditioning["image"] = args.image
    if args.num_frames:
        call_arguments["num_frames"] = args.num_frames
    pipe.set_progress_bar_config(disable=None)  # None: show on a terminal, hide in logs
    settings = GenerationSettings(
        prompt=args.prompt,
        negative_prompt=args.negative_prompt,
        steps=args.steps,
        guidance=args.guidance,
        seed=args.seed,
        num_images=args.num_images,
        width=args.width,
        height=args.height,
        scheduler=args.scheduler,
        extra=call_arguments,
    )
    images = generate(pipe, settings)
    extra: dict[str, Any] = {"adapters": adapters} if adapters else {}
    if args.quantize:
        extra["quantize"] = args.quantize
    extra.update(conditioning)
    metadata = [image_settings(pipe, settings, index, args.model, **extra) for index in range(len(images))]
    for path in write_images(images, args.output, metadata):
        print(path)
    return 0
