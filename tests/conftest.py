"""Every test runs offline on tiny models built in code; GPU tests skip without CUDA."""

import os
import tempfile

# Set before transformers / diffusers / huggingface_hub are imported anywhere.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models gain nothing from intra-op threads, and on a busy machine OpenMP threads that
# spin-wait on each other make every op many times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Latent/text caches of the tests stay out of the user's ~/.cache.
os.environ["PERSONALIZE_CACHE"] = tempfile.mkdtemp(prefix="personalize-test-cache-")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_pipelines():
    """Built once per session: name -> pipeline. Tests must not modify them (copy first)."""
    from personalize.models import TINY_DIFFUSION, build_tiny

    cache = {}

    def get(name):
        if name not in TINY_DIFFUSION:
            raise KeyError(name)
        if name not in cache:
            cache[name] = build_tiny(name)
        return cache[name]

    return get
