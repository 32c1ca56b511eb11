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


def assert_resume_reproduces(quick, monkeypatch, tmp_path, *, after_kill=None, **settings):
    """Train `settings` (checkpoint_every below steps) into a/; into b/ killed right after the first checkpoint,
    then resumed with other global RNG state (as a new process has): b/'s adapter must equal a/'s.
    `after_kill(folder)` checks the killed folder; returns the resumed run's result."""
    from safetensors.torch import load_file

    from personalize.trainers.common import loop

    uninterrupted = load_file(str(quick(**settings, output=str(tmp_path / "a")).output_dir / "a.safetensors"))
    save = loop.save_checkpoint

    def save_then_die(accelerator, state, root, keep):
        save(accelerator, state, root, keep)
        raise KeyboardInterrupt  # killed right after the first checkpoint

    monkeypatch.setattr(loop, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        quick(**settings, output=str(tmp_path / "b"))
    monkeypatch.setattr(loop, "save_checkpoint", save)
    if after_kill is not None:
        after_kill(tmp_path / "b")
    torch.manual_seed(999)
    result = quick(**settings, output=str(tmp_path / "b"), resume=True)
    resumed = load_file(str(result.output_dir / "b.safetensors"))
    assert resumed.keys() == uninterrupted.keys()
    for key, value in uninterrupted.items():
        torch.testing.assert_close(resumed[key], value, rtol=0, atol=1e-6, msg=key)
    return result


def one_line_error(capsys, argv):
    """Run the CLI on `argv`: it must exit 2 with exactly one `error: ...` line on stderr, which is returned."""
    from personalize.cli import main

    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    return err
