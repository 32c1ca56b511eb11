"""`personalize train` flags, presets and errors: every preset loads; bad input is one line, exit 2."""

import dataclasses

import pytest

from personalize.cli import main
from personalize.config import build, list_presets
from personalize.trainers.diffusion.config import TrainConfig, config_from_options, infer_words, resolve

from .conftest import CAT, one_line_error

PRESETS = ["sd15-lora", "sd15-dreambooth", "sd15-krona", "sd15-lokr", "sdxl-lora", "sdxl-lokr", "sdxl-qlora", "tiny"]
PRESETS += ["sd15-textual-inversion", "sdxl-textual-inversion", "sd15-pivotal", "sdxl-pivotal"]
PRESETS += ["sd15-ed-lora"]


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_loads_and_opens_with_its_command(name):
    from importlib import resources

    assert name in list_presets()
    text = resources.files("personalize.configs").joinpath(f"{name}.yaml").read_text()
    assert text.startswith("# personalize train ") and f"--preset {name}" in text.splitlines()[0]
    config, _ = resolve(build(TrainConfig, preset=name, flags={"data": {"images": str(CAT)}}))
    assert config.steps and config.lr and config.method


def test_krona_preset_has_the_paper_settings():
    config = build(TrainConfig, preset="sd15-krona")
    assert (config.method, config.lr, config.steps, config.batch_size, config.grad_accum) == ("krona", 1e-3, 500, 1, 4)
    assert config.method_options == {"a1": 64, "a2": 8} and config.targets == "attention"


def test_method_defaults_folder_words_and_output_are_resolved(tmp_path):
    folder = tmp_path / "sks_dog"
    folder.mkdir()
    config, notes = resolve(config_from_options({"images": str(folder), "method": "full"}))
    assert (config.data.token, config.data.class_word) == ("sks", "dog")
    assert (config.lr, config.steps, config.rank) == (5e-6, 400, None)
    assert config.output.endswith("personalize-out/sks_dog") and len(notes) == 2
    config, _ = resolve(config_from_options({"images": str(CAT), "class_word": "kitten", "rank": 8}))
    assert (config.data.class_word, config.rank, config.alpha, config.lr) == ("kitten", 8, 8.0, 1e-4)
    assert infer_words("10_sks cat") == ("sks", "cat") and infer_words("cat") == (None, "cat")


def test_flags_override_presets_and_set_overrides_flags():
    from personalize.cli import build_parser
    from personalize.trainers.cli import flags_to_config

    args = build_parser().parse_args(
        ["train", "--images", str(CAT), "--preset", "tiny", "--rank", "8", "--resolution", "32"]
        + ["--validation-prompt", "a", "--validation-prompt", "b", "--set", "rank=2", "--set", "data.flip=0.5"]
    )
    config = build(TrainConfig, preset=args.preset, flags=flags_to_config(args), overrides=args.set)
    assert (config.rank, config.data.resolution, config.data.flip, config.steps) == (2, 32, 0.5, 30)
    assert config.validation_prompts == ["a", "b"] and config.model == "tiny-sd15"


def test_bad_input_is_one_line_and_exit_2(capsys, tmp_path):
    base = ["train", "--images", str(CAT), "--model", "tiny-sd15", "--output", str(tmp_path / "out")]
    assert "did you mean 'rank'" in one_line_error(capsys, [*base, "--set", "rnak=4"])
    assert "does not exist" in one_line_error(capsys, ["train", "--images", str(tmp_path / "missing")])
    assert "lora" in one_line_error(capsys, [*base, "--method", "lorra"])
    assert "--steps" in one_line_error(capsys, [*base, "--steps", "0"])
    assert "--images" in one_line_error(capsys, ["train", "--model", "tiny-sd15"])
    assert "tiny-sd15" in one_line_error(capsys, [*base[:3], "--model", "not a model"])
    assert "prodigy" in one_line_error(capsys, [*base, "--optimizer", "prodigy", "--steps", "1"])
    assert not (tmp_path / "out").exists()


def test_unknown_python_option_names_the_nearest_key():
    from personalize.errors import UserError

    with pytest.raises(UserError, match="did you mean 'resolution'"):
        config_from_options({"images": str(CAT), "resolutoin": 64})
    assert dataclasses.is_dataclass(config_from_options({"images": str(CAT)}).data)


def test_cli_trains_the_tiny_preset_end_to_end(capsys, tmp_path, cache_dir):
    out = tmp_path / "cat-run"
    argv = ["train", "--images", str(CAT), "--preset", "tiny", "--steps", "2", "--output", str(out)]
    argv += ["--set", f"data.cache_dir={cache_dir}", "--set", "validation_steps=1", "--set", "validation_images=1"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "tiny-sd15 (sd1)" in printed and "class word 'cat'" in printed
    written = {path.name for path in out.iterdir()}
    assert written >= {"pytorch_lora_weights.safetensors", "cat-run.safetensors", "config.yaml", "README.md", "samples"}
    rerun = build(TrainConfig, file=out / "config.yaml")
    assert rerun.steps == 2 and rerun.data.images == str(CAT) and rerun.output == str(out)


def test_instance_prompt_flag_sets_the_training_prompt(tmp_path, capsys):
    """diffusers' --instance_prompt: a free prompt, not only 'a photo of <token> <class>'."""
    import yaml

    from personalize.cli import main

    assert main(["train", "--help"]) == 0
    assert "--instance-prompt" in capsys.readouterr().out
    out = tmp_path / "toy"
    argv = ["train", "--images", str(CAT), "--model", "tiny-sd15", "--steps", "1", "--output", str(out)]
    assert main([*argv, "--instance-prompt", "a sks toy", "--set", "validation_images=1"]) == 0
    assert yaml.safe_load((out / "config.yaml").read_text())["data"]["instance_prompt"] == "a sks toy"
    card = (out / "README.md").read_text()
    assert "a sks toy" in card and "a photo of sks cat" not in card
