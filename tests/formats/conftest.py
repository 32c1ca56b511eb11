"""Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP spinning makes a
tiny UNet forward 30x slower (0.1 s -> 3 s): these tests run torch on one thread."""

import pytest


@pytest.fixture(autouse=True, scope="package")
def _one_torch_thread():
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
