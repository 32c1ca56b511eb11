"""Paired data for conditioning adapters: each training image with its conditioning image.

The conditioning comes from a folder matched by file name (`photo-01.jpg` <-> `photo-01.png`), or
from a built-in annotator that needs no downloaded model:

- canny: Canny (1986) edges in torch: Gaussian blur, Sobel gradients, non-maximum suppression along
  the gradient direction quantized to 0/45/90/135 degrees, double threshold, hysteresis.
- tile: a blurred copy (area-downscale by 8, bicubic upscale), the input of tile/upscale ControlNets.

Conditioning tensors are (3, H, W) in [0, 1] (what diffusers' ControlNet/T2I-Adapter pipelines feed),
cropped and flipped with the same plan as the target image. Annotator outputs are cached on disk
(`<cache_dir>/conditioning/<annotator>/<image sha256>-<transform tag>.safetensors`, the key of the
latent cache): Canny costs about a second per 512 px image on a CPU, every epoch, otherwise.
IP-Adapter uses the same pairing for its reference images (`key="reference"`), or the target image
itself when no folder is given.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from personalize.data.decode import BadImage, decode, read_bytes
from personalize.data.sources import SIDECAR_SUFFIXES
from personalize.data.transforms import apply_plan, to_tensor
from personalize.errors import UserError

ANNOTATORS = ("canny", "tile")
ANNOTATE_VERSION = "1"  # bump when an annotator's output changes: older cache entries stop matching
MIN_GRADIENT = 0.05  # Sobel magnitude of a 1.25% brightness step; below it an image counts as flat


def _files_by_stem(folder: Path) -> dict[str, Path]:
    files = sorted(path for path in folder.iterdir() if path.is_file() and not path.name.startswith("."))
    return {path.stem: path for path in files if path.suffix.lower() not in SIDECAR_SUFFIXES}


def match_by_name(images: list[Path], folder: str | Path, what: str = "conditioning") -> dict[Path, Path]:
    """image path -> the file of `folder` with the same stem; UserError listing every unmatched name."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise UserError(f"--{what} {folder} is not a folder; pass a folder of images named like the training images")
    others = _files_by_stem(folder)
    stems = {path.stem for path in images}
    missing = sorted(path.name for path in images if path.stem not in others)
    extra = sorted(path.name for stem, path in others.items() if stem not in stems)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"no {what} image for {', '.join(missing)}")
        if extra:
            parts.append(f"{what} files without a training image: {', '.join(extra)}")
        raise UserError(f"{'; '.join(parts)} (in {folder}); name each {what} image like its training image")
    return {path: others[path.stem] for path in images}


# --- annotators (pure functions on (3, H, W) tensors in [0, 1]) -------------------------------------


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(2 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    return kernel / kernel.sum()  # (2r + 1,)


def _blur(gray: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of (1, 1, H, W), reflect-padded."""
    kernel = _gaussian_kernel(sigma)
    radius = kernel.numel() // 2
    gray = F.conv2d(F.pad(gray, (radius, radius, 0, 0), mode="reflect"), kernel.view(1, 1, 1, -1))
    return F.conv2d(F.pad(gray, (0, 0, radius, radius), mode="reflect"), kernel.view(1, 1, -1, 1))


def hysteresis(strong: torch.Tensor, weak: torch.Tensor) -> torch.Tensor:
    """Weak pixels (H, W) 8-connected to a strong one, by connected-component labels.

    Labels are parent pointers (pixel indices, a root points to itself). Each round hooks every root
    to the smallest label among its pixels' 3x3 weak neighbours, then jumps pointers (p <- parent[p]);
    as in Shiloach & Vishkin (1982), long edge chains take a few dozen rounds, not one per pixel.
    """
    height, width = weak.shape
    count = height * width
    dtype = torch.float32 if count < 2**24 else torch.float64  # min-pooling needs floats; exact integers
    parent = torch.arange(count, dtype=dtype)
    inside = weak.flatten()
    outside = torch.full((count,), float(count), dtype=dtype)
    while True:
        labels = torch.where(inside, parent, outside).view(1, 1, height, width)
        smallest = -F.max_pool2d(-labels, 3, stride=1, padding=1).flatten()  # 3x3 minimum label
        smallest = torch.where(inside, torch.minimum(smallest, parent), parent)
        hooked = parent.clone()
        hooked.scatter_reduce_(0, parent[inside].long(), smallest[inside], reduce="amin")  # root -> smaller
        hooked = torch.minimum(hooked, smallest)
        jumped = hooked[hooked.long()]  # pointer jumping
        if torch.equal(jumped, parent):
            break
        parent = jumped
    roots = torch.unique(parent[(strong & weak).flatten()])
    return (inside & torch.isin(parent, roots)).view(height, width)


def canny(image: torch.Tensor, low: float = 0.1, high: float = 0.2, sigma: float = 1.0) -> torch.Tensor:
    """Canny edges of (3, H, W) in [0, 1] -> (3, H, W) of 0/1; thresholds are fractions of the max gradient
    (so the edge density does not depend on the image's contrast)."""
    weights = torch.tensor([0.299, 0.587, 0.114]).view(3, 1, 1)
    gray = (image.float() * weights).sum(0)[None, None]  # (1, 1, H, W)
    gray = _blur(gray, sigma)
    sobel_x = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
    kernels = torch.stack([sobel_x, sobel_x.t()])[:, None]  # (2, 1, 3, 3)
    grad = F.conv2d(F.pad(gray, (1, 1, 1, 1), mode="replicate"), kernels)[0]  # (2, H, W)
    magnitude = grad.norm(dim=0)  # (H, W)
    # direction quantized to 4 bins: 0 = horizontal gradient, 1 = 45, 2 = vertical, 3 = 135 degrees
    angle = torch.rad2deg(torch.atan2(grad[1], grad[0])) % 180
    bins = ((angle + 22.5) // 45).long() % 4  # (H, W)
    padded = F.pad(magnitude[None, None], (1, 1, 1, 1))[0, 0]  # (H + 2, W + 2)
    height, width = magnitude.shape
    offsets = [(0, 1), (1, 1), (1, 0), (1, -1)]  # (dy, dx) along the gradient for each bin
    keep = torch.zeros_like(magnitude, dtype=torch.bool)
    for number, (dy, dx) in enumerate(offsets):
        ahead = padded[1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width]
        behind = padded[1 - dy : 1 - dy + height, 1 - dx : 1 - dx + width]
        keep |= (bins == number) & (magnitude >= ahead) & (magnitude >= behind)
    thin = magnitude * keep
    peak = thin.max()
    if peak < MIN_GRADIENT:  # a flat image: only rounding noise, no edge
        return torch.zeros_like(image, dtype=torch.float32)
    strong = thin >= high * peak
    weak = thin >= low * peak
    edges = hysteresis(strong, weak)
    return edges.float().expand(3, -1, -1).clone()  # (3, H, W)


def tile(image: torch.Tensor, factor: int = 8) -> torch.Tensor:
    """A blurred copy of (3, H, W) in [0, 1]: area-downscale by `factor`, bicubic upscale back."""
    height, width = image.shape[-2:]
    small = F.interpolate(
        image[None].float(), size=(max(1, height // factor), max(1, width // factor)), mode="area"
    )  # (1, 3, H/f, W/f)
    return F.interpolate(small, size=(height, width), mode="bicubic", align_corners=False)[0].clamp(0, 1)


def annotate(name: str, image: torch.Tensor) -> torch.Tensor:
    if name == "canny":
        return canny(image)
    if name == "tile":
        return tile(image)
    raise UserError(f"unknown annotator '{name}'; choose one of: {', '.join(ANNOTATORS)}")


# --- the dataset ----------------------------------------------------------------------------------


class PairedDataset:
    """Wraps an ImageDataset or its latent cache (CachedDataset): items gain `key` (3, H, W) in [0, 1],
    from a matched file or an annotator, transformed with the plan of the item's pixels or latents.

    With neither (`files=None, annotator=""`) the item's own pixels are the paired image (IP-Adapter).
    Keeps `buckets` and `config`, so `build_loader` batches it like the image dataset.
    """

    cached = False

    def __init__(self, base: Any, files: dict[Path, Path] | None, annotator: str = "", key: str = "conditioning"):
        if annotator and annotator not in ANNOTATORS:
            raise UserError(f"unknown annotator '{annotator}'; choose one of: {', '.join(ANNOTATORS)}")
        self.base = base
        self.files = files
        self.annotator = annotator
        self.key = key
        self.buckets = base.buckets
        self.config = base.config
        self.report = base.report
        self.records = base.records
        self.rows = base.rows

    def __len__(self) -> int:
        return len(self.base)

    def _from_file(self, path: Path, size: tuple[int, int], plan: Any) -> torch.Tensor:
        try:
            image = decode(read_bytes(path), self.base.background).image
        except BadImage as error:
            raise UserError(f"{self.key} image {path}: {error}; replace it") from None
        if image.size != (size[1], size[0]):  # another resolution than its photo: scale it to the photo first
            image = image.resize((size[1], size[0]))
        return to_tensor(apply_plan(image, plan)).add(1).div(2)  # (3, H, W) in [0, 1]

    def __getitem__(self, index: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = index if isinstance(index, tuple) else (0, index)
        item = self.base[(epoch, index)]
        record = self.base.records[self.base.rows[index]]
        plan = self.base.plan(index, epoch)
        if self.files is not None:
            item[self.key] = self._from_file(self.files[record.path], record.size, plan)
        elif self.annotator:
            item[self.key] = self._annotated(index, plan, item)
        else:
            item[self.key] = self._pixels(index, plan, item)
        return item

    def _pixels(self, index: int, plan: Any, item: dict[str, Any]) -> torch.Tensor:
        """The item's image (3, H, W) in [0, 1]; an item of the latent cache has none, so it is rendered."""
        pixels = item["pixels"] if "pixels" in item else self.base.source.render(index, plan)["pixels"]
        return pixels.add(1).div(2)

    def _annotated(self, index: int, plan: Any, item: dict[str, Any]) -> torch.Tensor:
        """annotate(pixels), read from / written to the on-disk cache."""
        from personalize.data.cache import cache_root, read_entry, write_entry

        key = f"{self.annotator}-v{ANNOTATE_VERSION}-{self.base.item_key(index, plan)}"
        path = cache_root(self.config.cache_dir or None) / "conditioning" / self.annotator / f"{key}.safetensors"
        entry = read_entry(path, key)  # every item of every epoch comes here: one open of the file
        if entry is not None:
            return entry["image"]
        image = annotate(self.annotator, self._pixels(index, plan, item))  # (3, H, W)
        write_entry(path, key, {"image": image})
        return image


def build_paired(
    base: Any, folder: str = "", annotator: str = "", key: str = "conditioning", what: str = "conditioning"
) -> PairedDataset:
    """PairedDataset over `base`: matched to `folder` by name when given, else `annotator` (or the image)."""
    files = match_by_name([record.path for record in base.records], folder, what) if folder else None
    return PairedDataset(base, files, "" if folder else annotator, key)
