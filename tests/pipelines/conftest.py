"""Shared helpers for the pipelines tests live in pipeline_helpers.py (importable from these tests)."""

import copy
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a busy 2-core machine OpenMP spin-waits make a
    1-step tiny pipeline call 30x slower with 2 threads than with 1."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def base_latents(tiny_pipelines):
    """name -> latents of the untouched tiny pipeline (computed once, on a copy)."""
    from pipeline_helpers import latents

    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = latents(copy.deepcopy(tiny_pipelines(name)))
        return cache[name]

    return get
