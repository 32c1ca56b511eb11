"""A base folder's training_defaults.json: a no-flags run starts from it, a chosen method does not."""

import json

import pytest

from personalize.cli import main
from personalize.errors import UserError
from personalize.models.training_defaults import FILE, training_defaults, under_model_defaults
from personalize.trainers.diffusion.config import config_from_options

DEFAULTS = {"_why": "measured", "method": "full", "lr": 1e-4, "steps": 1000, "data": {"bucket_step": 16}}


@pytest.fixture
def base(tmp_path):
    folder = tmp_path / "base"
    folder.mkdir()
    (folder / "model_index.json").write_text("{}")
    (folder / FILE).write_text(json.dumps(DEFAULTS))
    return folder


def test_a_run_naming_no_method_starts_from_the_folders_defaults(base):
    config = config_from_options({"model": str(base), "images": "photos", "steps": 5})
    assert (config.method, config.lr, config.steps, config.data.bucket_step) == ("full", 1e-4, 5, 16)
    assert config.data.images == "photos"  # the run's own options win, the rest come from the file


def test_a_chosen_method_keeps_the_tools_defaults(base):
    config = config_from_options({"model": str(base), "images": "photos", "method": "lora"})
    assert (config.method, config.lr, config.steps, config.data.bucket_step) == ("lora", None, None, 64)
    assert under_model_defaults({"model": "tiny-sd15"}, "tiny-sd15") == {"model": "tiny-sd15"}


def test_notes_are_not_options_and_a_broken_file_is_one_line(base):
    assert "_why" not in training_defaults(str(base))
    (base / FILE).write_text("{not json")
    with pytest.raises(UserError, match="is not valid JSON"):
        training_defaults(str(base))


def test_the_cli_reads_the_defaults_and_records_them_in_the_run(base, tmp_path, capsys):
    from personalize.config import build
    from personalize.trainers.diffusion.config import TrainConfig

    flags = {"model": str(base), "data": {"images": "photos"}}
    config = build(TrainConfig, flags=flags, base=lambda layers: under_model_defaults(layers, "tiny-sd15"))
    assert (config.method, config.steps) == ("full", 1000)
    (base / FILE).write_text("[1, 2]")
    assert main(["train", "--images", str(tmp_path), "--model", str(base)]) == 2
    assert "must hold a JSON object" in capsys.readouterr().err
