"""`DataConfig`: where the training images come from and how they become tensors (nested as `data:`)."""

from __future__ import annotations

from dataclasses import dataclass

from personalize.config import option


@dataclass
class DataConfig:
    images: str = option("", "folder of training images, or a dataset YAML (.yaml/.yml) listing several subsets")
    recursive: bool = option(False, "also read images from sub-folders (kohya-style `10_sks cat` folders always are)")
    token: str = option("sks", "trigger token: a rare word the model learns to bind to the subject")
    class_word: str = option("", "what the subject is (cat, person, ...); builds 'a photo of {token} {class_word}'")
    instance_prompt: str = option("", "overrides the built prompt; '[trigger]' in prompts and captions -> token")
    caption_extension: str = option(".txt", "sidecar caption file next to each image (then .caption); else the prompt")
    resolution: int | None = option(
        None,
        "training side length in pixels (buckets keep about resolution^2 pixels); None: the model's own "
        "(512 for SD1.5, 768 for SD2, 1024 for SDXL, 64 for the tiny models)",
    )
    bucketing: bool = option(True, "aspect-ratio buckets (no squashing, little cropping); off: square center crops")
    bucket_step: int = option(64, "bucket sides are multiples of this (VAE 8x times UNet 8x downsampling)")
    max_aspect: float = option(2.0, "widest/tallest bucket aspect ratio; images beyond it are cropped to it")
    no_upscale: bool = option(False, "never enlarge an image smaller than its bucket: it gets a smaller bucket instead")
    random_crop: bool = option(False, "random crop offsets (seeded per epoch) instead of center crops")
    flip: float = option(0.0, "probability of a horizontal flip per item and epoch (0: off; not for text/asymmetric)")
    repeats: int = option(1, "how many times each instance image appears per epoch")
    background: str = option("white", "color transparent pixels are composited on (name or #rrggbb)")
    alpha_mask: bool = option(False, "also return the alpha channel as a loss mask ('mask', 1 = subject)")
    class_dir: str = option("", "prior preservation: folder of class images (generated there when short)")
    class_prompt: str = option("", "prompt of the class images; default 'a photo of {class_word}'")
    num_class_images: int = option(0, "prior preservation: how many class images to use (0: off)")
    cache_dir: str = option("", "latent/text-embedding cache; '' -> $PERSONALIZE_CACHE or ~/.cache/personalize")
    frames: int = option(
        0,
        "video models: frames per training clip (0: the model's default, 17 for Wan; Wan takes 4k + 1); "
        "video files give their first N frames, still images one-frame clips",
    )
    fps: float = option(0.0, "video models: frame rate clips are sampled at (0: the model's default, 16 for Wan)")
    num_workers: int = option(-1, "DataLoader worker processes; -1 -> auto (0 for cached data, else cores - 1)")
