"""`personalize eval OUT` and `personalize train --eval`, end to end on the tiny model."""

import copy
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from personalize.cli import main

CAT = Path(__file__).resolve().parents[2] / "examples" / "cat"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_pipelines):
    """One tiny run for the whole module, trained with --eval (a one-prompt file) as a user would."""
    from personalize.trainers import train

    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("eval")
    prompts = folder / "p.txt"
    prompts.write_text("a {token} {class} at night\n")
    return train(
        pipe=copy.deepcopy(tiny_pipelines("tiny-sd15")),
        images=str(CAT),
        model="tiny-sd15",
        steps=2,
        lr=1e-2,
        resolution=64,
        output=str(folder / "cat"),
        validation_images=0,
        validation_steps=1,
        checkpoint_every=0,
        eval=str(prompts),
    )


@pytest.fixture(scope="module")
def run_dir(trained):
    return trained.output_dir


def test_train_with_eval_writes_the_evaluation(trained):
    assert (trained.output_dir / "eval" / "eval.json").is_file()
    assert set(trained.metrics["eval"]) >= {"dino", "clip_i", "clip_t", "drift"}
    assert (trained.output_dir / "loss.png").is_file()  # every run plots its loss
    saved = json.loads((trained.output_dir / "metrics.json").read_text())
    assert saved["eval"] == trained.metrics["eval"]  # metrics.json carries the figures too


def test_textual_inversion_run_with_eval(tmp_path, tiny_pipelines):
    """--eval after the token recipe: the learned embedding is what the evaluation loads and scores."""
    from personalize.trainers import train

    prompts = tmp_path / "p.txt"
    prompts.write_text("a {token} {class} on a beach\n")
    result = train(
        pipe=copy.deepcopy(tiny_pipelines("tiny-sd15")),
        images=str(CAT),
        model="tiny-sd15",
        method="textual-inversion",
        steps=2,
        resolution=64,
        output=str(tmp_path / "ti"),
        validation_images=0,
        validation_steps=1,
        checkpoint_every=0,
        eval=str(prompts),
    )
    assert (result.output_dir / "eval" / "eval.json").is_file()
    assert set(result.metrics["eval"]) >= {"dino", "clip_i", "clip_t", "drift"}


def test_eval_writes_figures_table_and_contact_sheet(run_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a {token} {class} in the snow\n")
    code = main(
        ["eval", str(run_dir), "--prompts", str(prompts), "--seeds", "2", "--steps", "1", "--class-prompts", "1"]
    )
    assert code == 0
    saved = json.loads((run_dir / "eval" / "eval.json").read_text())
    figures = saved["figures"]
    for key in ("dino", "clip_i", "clip_t", "class_dino", "class_clip", "drift"):
        assert -1.0 <= figures[key] <= 1.0
    assert figures["metric_models"] == {"dino": "tiny-dino", "clip": "tiny-clip"}  # tiny base: offline metric models
    assert [row["prompt"] for row in saved["per_prompt"]] == ["a photo of sks cat", "a sks cat in the snow"]
    assert saved["sheet_rows"] == [
        "a photo of sks cat",
        "a sks cat in the snow",
        "base: a photo of a cat",
        "adapter: a photo of a cat",
    ]
    table = (run_dir / "eval" / "eval.md").read_text()
    assert "| DINO (subject) |" in table and "| a sks cat in the snow |" in table
    sheet = Image.open(run_dir / "eval" / "contact_sheet.png")
    assert sheet.size == (2 * 64 + 2, 4 * 64 + 3 * 2)  # 2 seeds x 4 rows of 64 px images, 2 px gaps
    assert "eval: DINO" in capsys.readouterr().out


def test_eval_is_reproducible(run_dir, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a {token} {class} on the beach\n")
    args = ["eval", str(run_dir), "--prompts", str(prompts), "--seeds", "1", "--steps", "1", "--class-prompts", "1"]
    assert main(args) == 0
    first = json.loads((run_dir / "eval" / "eval.json").read_text())["figures"]
    assert main(args) == 0
    assert json.loads((run_dir / "eval" / "eval.json").read_text())["figures"] == first


@pytest.mark.parametrize(
    "args, message",
    [
        (["eval", "/no/such/run"], "is not a folder"),
        (["eval", "{run}", "--prompts", "/no/such.txt"], "not 'dreambench'"),
        (["eval", "{run}", "--metric-model", "sam=x"], "dino=ID or clip=ID"),
        (["eval", "{run}", "--seeds", "0"], "at least 1"),
    ],
)
def test_bad_input_is_one_line(run_dir, capsys, args, message):
    args = [arg.replace("{run}", str(run_dir)) for arg in args]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]


def test_train_eval_flag_checks_its_prompt_file_before_training(tmp_path, capsys):
    code = main(
        [
            "train",
            "--images",
            str(CAT),
            "--model",
            "tiny-sd15",
            "--eval",
            str(tmp_path / "none.txt"),
            "--output",
            str(tmp_path / "o"),
        ]
    )
    assert code == 2
    assert "not 'dreambench' and not a prompt file" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
