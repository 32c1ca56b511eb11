"""Typed configs: presets from the package, strict keys and types, layered overrides."""

from dataclasses import dataclass, field
from typing import Literal

import pytest

from personalize import config
from personalize.config import option
from personalize.errors import UserError


@dataclass
class Data:
    flip: bool = option(False, "mirror half of the images")
    repeats: int = option(1, "times each image is seen per epoch")


@dataclass
class Example:
    model: str = option("tiny-sd15", "base model")
    method: Literal["lora", "lokr"] = option("lora", "adapter method")
    rank: int = option(4, "adapter rank")
    lr: float = option(1e-4, "learning rate")
    prompts: list[str] = option([], "validation prompts")
    seed: int | None = option(None, "random seed")
    data: Data = field(default_factory=Data)


def test_presets_are_found_in_the_installed_package():
    presets = config.list_presets()
    assert "tiny" in presets
    assert config.read_preset("tiny")["model"] == "tiny-sd15"


def test_unknown_preset_suggests_the_nearest():
    with pytest.raises(UserError, match="did you mean 'tiny'"):
        config.read_preset("tinny")


def test_layers_and_types():
    built = config.build(
        Example,
        flags={"rank": 8, "lr": None},
        overrides=["lr=1e-3", "data.flip=true", "prompts=a cat", "seed=3"],
    )
    assert built == Example(rank=8, lr=1e-3, prompts=["a cat"], seed=3, data=Data(flip=True))


def test_file_layer(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("method: lokr\nrank: 16\ndata:\n  repeats: 10\n")
    built = config.build(Example, file=path, overrides=["rank=2"])
    assert (built.method, built.rank, built.data.repeats) == ("lokr", 2, 10)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["rnak=4"], "unknown config key 'rnak' (did you mean 'rank'?)"),
        (["data.flp=true"], "unknown config key 'data.flp' (did you mean 'data.flip'?)"),
        (["rank=four"], "rank must be a whole number"),
        (["method=lorra"], "method must be one of lora, lokr"),
        (["data.flip=maybe"], "data.flip must be true or false"),
        (["rank"], "--set expects key=value"),
    ],
)
def test_bad_overrides_name_the_key(overrides, message):
    with pytest.raises(UserError) as caught:
        config.build(Example, overrides=overrides)
    assert message in str(caught.value)


def test_saved_yaml_reproduces_the_config(tmp_path):
    original = config.build(Example, overrides=["rank=7", "prompts=[a, b]", "data.flip=true"])
    path = config.save_yaml(original, tmp_path / "config.yaml", header="# personalize train --config config.yaml")
    assert path.read_text().startswith("# personalize train")
    assert config.build(Example, file=path) == original


def test_describe_lists_help():
    rows = {key: help_text for key, _, help_text in config.describe(Example)}
    assert rows["rank"] == "adapter rank"
