"""Shared helpers for the pipelines tests live in pipeline_helpers.py (importable from these tests)."""

import copy
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


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
