"""Seconds per training batch on the data side, with and without the latent/text cache.

Uncached: read + decode + bucket/crop + VAE encode + text encode for every batch (what a training
step waits for when nothing is cached). Cached: read the safetensors entries. Also reported: the
one-time cost of building the cache, and of reopening it in a later run (fingerprinting the
encoders' weights + checking entries). Models: tiny-sd15, and the SD1.5-architecture VAE (84M) and
CLIP ViT-L text encoder (123M) with random weights from `benchmarks.sd15_arch`. Images: synthetic
photo-like 2048 x 1536 JPEGs (decoded with JPEG draft scaling). fp32, CPU, num_workers=0.
The tiny VAE downsamples only 2x and has self-attention over every latent position, so its encode
cost grows with the square of the pixel count (65536 tokens at 512 px): slower than the real one.

    python -m benchmarks.data                         # tiny-sd15 and sd15-arch at 256 and 512 px
    python -m benchmarks.data --models tiny-sd15 --resolutions 256 --images 4
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402


def photo_like(path: Path, seed: int, size: tuple[int, int] = (2048, 1536)) -> None:
    """Smooth random color fields plus grain: JPEG-compresses and decodes like a photo, not like noise."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)
    grain = rng.normal(0, 6, size=(size[1], size[0], 3))
    array = np.clip(np.asarray(image, dtype=np.float64) + grain, 0, 255).astype(np.uint8)
    Image.fromarray(array).save(path, quality=90)


def make_pipeline(name: str):
    from personalize.models import build_tiny

    tiny = build_tiny("tiny-sd15")
    if name == "tiny-sd15":
        return tiny
    if name != "sd15-arch":
        raise SystemExit(f"unknown model {name}; use tiny-sd15 or sd15-arch")
    from diffusers import StableDiffusionPipeline

    from benchmarks.sd15_arch import sd15_text_encoder, sd15_vae

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        vae, text_encoder = sd15_vae().eval(), sd15_text_encoder().eval()
    # The tiny UNet only tells the family (sd1); the data side never runs it.
    return StableDiffusionPipeline(**{**tiny.components, "vae": vae, "text_encoder": text_encoder})


@torch.no_grad()
def seconds_per_batch(loader, pipe, epochs: int, encode: bool | None) -> float:
    """encode True: VAE + text encoders on each batch; False: touch cached latents; None: loading only."""
    from personalize.models.encode import encode_images, encode_text

    batches, start = 0, time.perf_counter()
    for _ in range(epochs):
        for batch in loader:
            if encode:
                encode_images(pipe.vae, batch["pixels"])
                encode_text(pipe, batch["prompt"])
            elif encode is False:
                batch["latents"].sum()
            batches += 1
    return (time.perf_counter() - start) / batches


def run(model: str, resolution: int, folder: Path, batch_size: int, epochs: int) -> dict[str, float]:
    from personalize.data import DataConfig, build_dataset, build_loader, cache_dataset

    pipe = make_pipeline(model)
    config = DataConfig(images=str(folder), class_word="cat", resolution=resolution, flip=0.5)
    dataset = build_dataset(config, seed=0)
    loading = seconds_per_batch(build_loader(dataset, batch_size, num_workers=0), pipe, epochs, encode=None)
    uncached = seconds_per_batch(build_loader(dataset, batch_size, num_workers=0), pipe, epochs, encode=True)
    with tempfile.TemporaryDirectory() as cache_dir:
        start = time.perf_counter()
        cache_dataset(dataset, pipe, cache_dir=cache_dir)
        build = time.perf_counter() - start
        start = time.perf_counter()
        cached = cache_dataset(build_dataset(config, seed=0), pipe, cache_dir=cache_dir)
        reopen = time.perf_counter() - start
        assert cached.stats.latents_encoded == 0 and cached.stats.text_encoded == 0
        per_batch = seconds_per_batch(build_loader(cached, batch_size, num_workers=0), pipe, epochs, encode=False)
    return {"loading": loading, "uncached": uncached, "cached": per_batch, "build": build, "reopen": reopen}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny-sd15", "sd15-arch"])
    parser.add_argument("--resolutions", nargs="+", type=int, default=[256, 512])
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores; fp32 CPU")
    print(f"{args.images} JPEGs 2048x1536, batch {args.batch_size}, flip 0.5, {args.epochs} epochs per measurement")
    header = (
        "| model | px | decode+crop s/batch | uncached s/batch | cached s/batch | speed-up | cache build s "
        "| cache reopen s |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "photos"
        folder.mkdir()
        for number in range(args.images):
            photo_like(folder / f"photo-{number}.jpg", seed=number)
        for model in args.models:
            for resolution in args.resolutions:
                result = run(model, resolution, folder, args.batch_size, args.epochs)
                cells = [
                    model,
                    str(resolution),
                    f"{result['loading']:.3f}",
                    f"{result['uncached']:.3f}",
                    f"{result['cached']:.4f}",
                    f"{result['uncached'] / result['cached']:.0f}x",
                    f"{result['build']:.2f}",
                    f"{result['reopen']:.2f}",
                ]
                print(
                    "| " + " | ".join(cells) + " |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
