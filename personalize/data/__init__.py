"""From a folder of images to cached training batches.

dataset = build_dataset(DataConfig(images="photos/", class_word="cat"), seed=0)
loader = build_loader(dataset, batch_size=2, seed=0)          # one bucket per batch
cached = cache_dataset(dataset, pipe)                          # latents + text embeddings on disk
"""

from personalize.data.config import DataConfig
from personalize.data.dataset import DataReport, ImageDataset, build_dataset
from personalize.data.loader import build_loader, collate

__all__ = ["DataConfig", "DataReport", "ImageDataset", "build_dataset", "build_loader", "collate"]
