"""Shared pieces of the trainer tests: one thread (two-core CI machines are shared), a latent cache per session."""

import copy
from pathlib import Path

import pytest
import torch

CAT = Path(__file__).resolve().parents[2] / "examples" / "cat"


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from 2 threads and slow down badly when the cores are busy."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("latent-cache")


@pytest.fixture
def quick(tiny_pipelines, cache_dir, tmp_path):
    """train(...) on a copy of a tiny pipeline with settings that keep a run around a second."""
    from personalize.trainers import train

    def run(model="tiny-sd15", **options):
        settings = dict(
            images=str(CAT),
            model=model,
            steps=2,
            resolution=64,
            output=str(tmp_path / "out"),
            cache_dir=str(cache_dir),
            validation_steps=1,
            validation_images=1,
            checkpoint_every=0,
        )
        settings.update(options)
        return train(pipe=copy.deepcopy(tiny_pipelines(model)), **settings)

    return run
