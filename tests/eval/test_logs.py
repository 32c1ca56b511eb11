"""Training logs: --report-to tensorboard through accelerate's tracker, loss.png on every run."""

import copy
import importlib.util
from pathlib import Path

import pytest
from PIL import Image

from personalize.cli import main
from personalize.eval import logs

CAT = Path(__file__).resolve().parents[2] / "examples" / "cat"


def test_smoothing_by_hand():
    # w = 0.5: s1 = 0.5 * 1 / (1 - 0.5) = 1; s2 = (0.25 + 0.5 * 0) / (1 - 0.25) = 1/3
    assert logs.smoothed([1.0, 0.0], weight=0.5) == pytest.approx([1.0, 1 / 3])


def test_loss_plot_and_its_install_hint(tmp_path, monkeypatch):
    path = logs.write_loss_plot([1.0, 0.8, 0.9, 0.5], tmp_path / "loss.png")
    assert Image.open(path).size == (600, 350)
    said = []
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "matplotlib" else real(name, *a))
    assert logs.write_loss_plot([1.0], tmp_path / "other.png", say=said.append) is None
    assert said == ["note: loss.png needs matplotlib: pip install 'personalize[logs]'"]


def test_missing_tracker_is_one_line_before_loading(tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    args = ["train", "--images", str(CAT), "--model", "tiny-sd15", "--output", str(tmp_path / "o")]
    assert main([*args, "--report-to", "wandb"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs the wandb package: pip install wandb" in err[0]
    assert main([*args, "--report-to", "mlflow"]) == 2
    assert "report_to" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_tensorboard_gets_loss_lr_grad_norm_and_samples(tmp_path, tiny_pipelines):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from personalize.trainers import train

    out = tmp_path / "cat"
    train(
        pipe=copy.deepcopy(tiny_pipelines("tiny-sd15")),
        images=str(CAT),
        model="tiny-sd15",
        steps=3,
        resolution=64,
        output=str(out),
        validation_images=1,
        validation_steps=1,
        checkpoint_every=0,
        report_to="tensorboard",
    )
    assert Image.open(out / "loss.png").size == (600, 350)
    (run_logs,) = (out / "logs").iterdir()
    events = EventAccumulator(str(run_logs), size_guidance={"images": 0, "scalars": 0}).Reload()
    tags = events.Tags()
    assert {"loss", "lr", "grad_norm"} <= set(tags["scalars"])
    assert [event.step for event in events.Scalars("loss")] == [1, 2, 3]
    assert "samples" in tags["images"]
