"""Nothing a user made is lost: failed runs leave the output folder alone, finished runs are not
overwritten silently, Ctrl-C saves the adapter and a resumable checkpoint, the adapter is written
before the end-of-run samples, and an output that would clobber files is refused."""

from __future__ import annotations

import json
import os
import shutil
import signal

import pytest
import torch
from safetensors.torch import load_file

from personalize.cli import main
from personalize.trainers.common import loop
from personalize.trainers.diffusion import dreambooth

from .conftest import CAT

FAST = ["--model", "tiny-sd15", "--steps", "2", "--resolution", "64", "--set", "validation_images=1"]


def _train(images, output, *more):
    return main(["train", "--images", str(images), "--output", str(output), *FAST, *more])


def _snapshot(folder):
    return {path.relative_to(folder): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


def test_a_failed_run_leaves_the_earlier_run_untouched(tmp_path, capsys):
    out = tmp_path / "A"
    assert _train(CAT, out, "--checkpoint-every", "1") == 0
    before = _snapshot(out)
    assert any(str(path).startswith("checkpoints") for path in before)
    capsys.readouterr()
    # Without --overwrite a finished run is refused before anything loads...
    assert _train(CAT, out, "--method", "loha") == 2
    err = capsys.readouterr().err
    assert "holds a finished run" in err and "--overwrite" in err and len(err.strip().splitlines()) == 1
    # ...and with it, a run that fails while loading (a mistyped model) still changes nothing.
    assert main(["train", "--images", str(CAT), "--output", str(out), "--model", "someone/typo", "--overwrite"]) == 2
    assert "starting over" not in capsys.readouterr().out
    assert _snapshot(out) == before


def test_overwrite_replaces_the_run_and_keeps_what_it_did_not_write(tmp_path, capsys):
    out = tmp_path / "A"
    assert _train(CAT, out, "--validate-every", "1") == 0
    old_samples = sorted(path.name for path in (out / "samples").iterdir())
    assert len(old_samples) == 2
    (out / "class_images").mkdir()
    (out / "class_images" / "keep.txt").write_text("generated class images are reused, not replaced")
    assert _train(CAT, out, "--method", "loha", "--overwrite") == 0
    assert sorted(path.name for path in (out / "samples").iterdir()) == ["step-000002.png"]  # no stale grids
    assert not (out / "pytorch_lora_weights.safetensors").exists()  # the LoRA run's file is gone
    assert (out / "A.safetensors").is_file() and (out / "class_images" / "keep.txt").is_file()
    assert "removed the previous run's" in capsys.readouterr().out


@pytest.fixture
def interrupt_after_first_step(monkeypatch):
    """Deliver a real SIGINT (what Ctrl-C sends) while step 1 ends: the loop must finish step 2 only."""
    original = loop.any_process
    calls = []

    def signal_once(accelerator, flag):
        calls.append(flag)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGINT)
        return original(accelerator, flag)

    monkeypatch.setattr(loop, "any_process", signal_once)
    return calls


def test_ctrl_c_saves_the_adapter_and_a_checkpoint_that_resumes_exactly(
    quick, tmp_path, monkeypatch, interrupt_after_first_step
):
    settings = dict(method="lora", rank=4, steps=4, lr=1e-3, checkpoint_every=0)
    with pytest.raises(KeyboardInterrupt, match=r"interrupted at step 2 of 4.*--resume"):
        quick(**settings, output=str(tmp_path / "b"))
    out = tmp_path / "b"
    assert (out / "b.safetensors").is_file()  # the adapter as of step 2
    assert (out / "checkpoints" / "step-000002").is_dir()
    assert json.loads((out / "metrics.json").read_text())["stopped_early"] is True
    assert not (out / "samples").exists() or not any((out / "samples").iterdir())  # no end-of-run samples
    monkeypatch.undo()  # no more signals
    uninterrupted = load_file(str(quick(**settings, output=str(tmp_path / "a")).output_dir / "a.safetensors"))
    resumed = quick(**settings, output=str(out), resume=True)
    assert resumed.metrics["steps"] == 4 and resumed.metrics["stopped_early"] is False
    final = load_file(str(out / "b.safetensors"))
    for key, value in uninterrupted.items():
        torch.testing.assert_close(final[key], value, rtol=0, atol=1e-6, msg=key)


def test_ctrl_c_in_the_cli_says_where_the_work_is(tmp_path, capsys, interrupt_after_first_step):
    out = tmp_path / "run"
    assert main(["train", "--images", str(CAT), "--output", str(out), *FAST, "--steps", "3"]) == 130
    err = capsys.readouterr().err
    assert "interrupted at step 2 of 3" in err and str(out) in err and "--resume" in err
    capsys.readouterr()
    # an interrupted run is not a finished one: plain rerun is refused, --resume continues it
    assert main(["train", "--images", str(CAT), "--output", str(out), *FAST, "--steps", "3"]) == 2
    assert "unfinished run" in capsys.readouterr().err
    assert main(["train", "--images", str(CAT), "--output", str(out), *FAST, "--steps", "3", "--resume"]) == 0
    assert json.loads((out / "metrics.json").read_text())["steps"] == 3


def test_the_adapter_is_written_before_the_final_samples(quick, tmp_path, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("killed while sampling")

    monkeypatch.setattr(dreambooth, "_validate", crash)
    with pytest.raises(RuntimeError, match="sampling"):
        quick(method="lora", rank=4, output=str(tmp_path / "c"))
    assert (tmp_path / "c" / "c.safetensors").is_file()
    assert (tmp_path / "c" / "pytorch_lora_weights.safetensors").is_file()


def test_an_output_that_would_clobber_files_is_refused(tmp_path, capsys):
    photos = tmp_path / "photos"
    shutil.copytree(CAT, photos)
    before = sorted(path.name for path in photos.iterdir())
    existing = tmp_path / "notes.txt"
    existing.write_text("mine")
    for output, reason in ((existing, "is a file"), (photos, "inside the training data"), (photos / "o", "inside")):
        assert _train(photos, output) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and reason in err and len(err.strip().splitlines()) == 1
    assert sorted(path.name for path in photos.iterdir()) == before and existing.read_text() == "mine"
