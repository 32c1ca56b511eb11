"""`personalize train --eval` and `--report-to` on the flow-matching recipe (tiny-flux), as on the UNet recipe."""

import importlib.util
import json

from PIL import Image

from personalize.cli import main

from .conftest import CAT


def test_flux_run_with_eval_and_tensorboard_logs_loss_samples_and_scores(tmp_path, cache_dir, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a {token} {class} at night\n")
    out = tmp_path / "run"
    argv = ["train", "--images", str(CAT), "--model", "tiny-flux", "--steps", "2", "--resolution", "32"]
    argv += ["--output", str(out), "--set", f"data.cache_dir={cache_dir}", "--set", "validation_steps=1"]
    argv += ["--set", "validation_images=1", "--set", "checkpoint_every=0"]
    assert main([*argv, "--eval", str(prompts), "--report-to", "tensorboard"]) == 0
    assert "objective   flow matching" in capsys.readouterr().out

    saved = json.loads((out / "eval" / "eval.json").read_text())
    assert {"dino", "clip_i", "clip_t", "drift"} <= set(saved["figures"])
    assert Image.open(out / "loss.png").size == (600, 350)
    (run_logs,) = (out / "logs").iterdir()
    events = EventAccumulator(str(run_logs), size_guidance={"images": 0, "scalars": 0}).Reload()
    tags = events.Tags()
    assert {"loss", "lr", "grad_norm", "eval/dino", "eval/clip_t"} <= set(tags["scalars"])
    assert [event.step for event in events.Scalars("loss")] == [1, 2]
    assert {"samples", "eval/contact_sheet"} <= set(tags["images"])


def test_flux_report_to_none_writes_no_logs_and_a_missing_tracker_is_one_line(tmp_path, cache_dir, capsys, monkeypatch):
    argv = ["train", "--images", str(CAT), "--model", "tiny-flux", "--steps", "1", "--resolution", "32"]
    argv += ["--set", f"data.cache_dir={cache_dir}", "--set", "validation_images=0", "--set", "checkpoint_every=0"]
    assert main([*argv, "--output", str(tmp_path / "plain"), "--report-to", "none"]) == 0
    assert (tmp_path / "plain" / "loss.png").is_file() and not (tmp_path / "plain" / "logs").exists()

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    capsys.readouterr()
    assert main([*argv, "--output", str(tmp_path / "w"), "--report-to", "wandb"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs the wandb package: pip install wandb" in err[0]
    assert not (tmp_path / "w").exists()
