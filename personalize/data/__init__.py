"""From a folder of images to cached training batches.

dataset = build_dataset(DataConfig(images="photos/", class_word="cat"), seed=0)
loader = build_loader(dataset, batch_size=2, seed=0)       # every batch from one bucket
cached = cache_dataset(dataset, pipe)                       # latents + text embeddings on disk
build_loader(cached, batch_size=2, seed=0)                  # the VAE and text encoders can go
"""

from personalize.data.cache import CachedDataset, cache_dataset, cache_root
from personalize.data.class_images import ensure_class_images
from personalize.data.config import DataConfig
from personalize.data.dataset import DataReport, ImageDataset, build_dataset
from personalize.data.loader import build_loader, collate

__all__ = [
    "CachedDataset",
    "DataConfig",
    "DataReport",
    "ImageDataset",
    "build_dataset",
    "build_loader",
    "cache_dataset",
    "cache_root",
    "collate",
    "ensure_class_images",
]
