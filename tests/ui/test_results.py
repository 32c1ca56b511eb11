"""The Results tab reads what runs wrote: model card, losses, samples, adapter files, eval figures."""

import json

from PIL import Image

from personalize.ui.app import Page
from personalize.ui.jobs import JobQueue
from personalize.ui.workspace import Workspace


def test_results_show_a_run_with_its_eval_figures(tmp_path):
    workspace = Workspace(tmp_path / "root", queue=JobQueue(tmp_path / "state", devices=["cpu"]))
    run = workspace.root / "runs" / "cat"
    (run / "samples").mkdir(parents=True)
    (run / "eval").mkdir()
    (run / "config.yaml").write_text("method: lora\n")
    (run / "README.md").write_text("# cat\n- final loss: 0.1000 after 3 steps\n")
    (run / "metrics.json").write_text(json.dumps({"final_loss": 0.1, "losses": [0.3, 0.2, 0.1]}))
    (run / "pytorch_lora_weights.safetensors").write_bytes(b"x")
    Image.new("RGB", (8, 8)).save(run / "samples" / "step-000003.png")
    Image.new("RGB", (8, 8)).save(run / "loss.png")
    Image.new("RGB", (8, 8)).save(run / "eval" / "contact_sheet.png")
    (run / "eval" / "eval.json").write_text(json.dumps({"dino": 0.5}))
    (run / "eval" / "eval.md").write_text("| metric | value |\n| dino | 0.5 |\n")

    assert workspace.run_names() == ["runs/cat"]
    card, losses, samples, files, figures, pictures, _ = Page(workspace).result("runs/cat")
    assert "final loss: 0.1000" in card
    assert list(losses["step"]) == [1, 2, 3] and list(losses["loss"]) == [0.3, 0.2, 0.1]
    assert [label for _, label in samples] == ["step-000003"]
    assert any(path.endswith("pytorch_lora_weights.safetensors") for path in files)
    assert "| dino | 0.5 |" in figures
    assert [label for _, label in pictures] == ["loss.png", "contact_sheet.png"]
    assert Page(workspace).result("../elsewhere")[0].startswith("**error:**")
