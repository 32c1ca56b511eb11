"""The mini DreamBench: its world, its measures' calibration, and the default preset on its pretrained base."""

import numpy as np
import pytest

from benchmarks.dreambench_mini import measures, world
from personalize.errors import UserError
from personalize.models import world as world_model

SLOW_STEPS = 1000  # half the default: full fine-tuning put the ball in 0.50-0.55 of new contexts here


def test_world_is_deterministic_and_captioned():
    first = world.world_sample(np.random.default_rng(5))
    second = world.world_sample(np.random.default_rng(5))
    assert np.array_equal(first[0], second[0]) and first[1] == second[1]
    assert first[0].shape == (world.SIZE, world.SIZE, 3) and first[0].dtype == np.uint8


@pytest.mark.parametrize("subject", list(world.SUBJECTS))
def test_measures_are_calibrated(subject):
    scores = measures.calibrate(subject, seeds=3)
    assert scores["perfect"] == {"subject": 1.0, "prompt": 1.0, "in_context": 1.0, "class_accuracy": 1.0}
    assert scores["instance photos"]["subject"] == 1.0 and scores["instance photos"]["in_context"] == 0.0
    assert scores["class, no subject"]["subject"] == 0.0 and scores["class, no subject"]["prompt"] == 1.0
    assert scores["noise"]["in_context"] == 0.0


def test_parse_reads_a_rendered_scene():
    rng = np.random.default_rng(0)
    scene = world.random_scene(rng, shape="cone", colour="yellow", context="at night")
    parsed = measures.parse(world.render(scene, rng))
    assert (parsed.shape, parsed.colour, parsed.context, parsed.subject) == ("cone", "yellow", "at night", None)
    subject = measures.parse(world.subject_images("box", count=1)[0])
    assert subject.subject == "box" and subject.context == "in a room"


def test_two_coloured_objects_never_carry_a_subjects_pairing_on_its_shape():
    rng = np.random.default_rng(1)
    scenes = [world.random_scene(rng, two_tone=1.0) for _ in range(600)]
    assert all(scene.lower and scene.lower != scene.colour for scene in scenes)
    assert not {(scene.shape, scene.colour, scene.lower) for scene in scenes} & world.HELD_OUT
    pairs = {(scene.colour, scene.lower) for scene in scenes}
    assert all((subject.top_colour, subject.bottom_colour) in pairs for subject in world.SUBJECTS.values())
    scene = world.random_scene(rng, shape="cone", colour="red", context="on the grass")
    parsed = measures.parse(world.render(world.Scene(**{**scene.__dict__, "lower": "blue"}), rng))
    assert (parsed.upper, parsed.lower, parsed.subject) == ("red", "blue", None)
    assert "red and blue cone" in world.caption(world.Scene(**{**scene.__dict__, "lower": "blue"}), rng, drop=0.0)


def test_world_model_name_resolves_to_its_folder(tmp_path, monkeypatch):
    (tmp_path / "model_index.json").write_text("{}")
    monkeypatch.setenv("PERSONALIZE_WORLD_MODEL", str(tmp_path))
    assert world_model.resolve_model("dreambench-mini") == str(tmp_path)
    assert world_model.resolve_model("tiny-sd15") == "tiny-sd15"
    monkeypatch.setattr(world_model, "world_model_candidates", lambda: [tmp_path / "none"])
    with pytest.raises(UserError, match="python -m benchmarks.dreambench_mini.pretrain"):
        world_model.resolve_model("dreambench-mini")


def _world_model_built() -> bool:
    return any((folder / "model_index.json").is_file() for folder in world_model.world_model_candidates())


@pytest.mark.skipif(not _world_model_built(), reason="build it first: python -m benchmarks.dreambench_mini.pretrain")
@pytest.mark.slow
def test_default_preset_beats_no_training_on_the_world(tmp_path):
    """The no-flags default (the base's training_defaults.json), trained for half its steps on a novel subject:
    the subject appears in new contexts where the untrained base never draws it, and class prompts still
    draw the class (drift bounded)."""
    import torch

    from benchmarks.dreambench_mini import run
    from personalize.cli import main
    from personalize.models import load_pipeline

    torch.set_num_threads(1)
    photos = run.write_photos(tmp_path, "ball")
    out = tmp_path / "run"
    argv = ["train", "--images", str(photos), "--model", "dreambench-mini", "--token", "sks", "--class-word", "ball"]
    argv += [*run.WORLD_FLAGS, "--steps", str(SLOW_STEPS), "--output", str(out), "--set", "validation_images=0"]
    assert main(argv) == 0
    pipe = load_pipeline("dreambench-mini")
    pipe.set_progress_bar_config(disable=True)
    base = run.draw(pipe, None, "ball", "sks", seeds=2)["figures"]
    trained = run.draw(pipe, out, "ball", "sks", seeds=2)["figures"]
    assert base["subject"] == 0.0  # the world never held the subject
    assert trained["in_context"] >= base["in_context"] + 0.25
    assert base["class_accuracy"] - trained["class_accuracy"] <= 0.125


def test_demo_grid_puts_before_and_after_side_by_side(tmp_path):
    from PIL import Image

    from benchmarks.dreambench_mini import demo

    red, blue = np.zeros((world.SIZE, world.SIZE, 3), np.uint8), np.zeros((world.SIZE, world.SIZE, 3), np.uint8)
    red[..., 0], blue[..., 2] = 255, 255
    prompts = ["a photo of sks ball on the grass", "a photo of a red ball on the grass"]
    before = {"images": {text: [red, red] for text in prompts}, "prompts": prompts}
    after = {"images": {text: [blue, blue] for text in prompts}, "prompts": prompts}
    path = demo.before_after_grid(before, after, world.subject_images("ball", count=2), tmp_path / "grid.png")
    grid = np.asarray(Image.open(path))
    cell = world.SIZE * demo.SCALE
    assert grid.shape == (18 + 3 * cell, demo.LABEL_WIDTH + 4 * cell + cell // 2, 3)
    row = 18 + cell + cell // 2  # the first prompt's row
    assert tuple(grid[row, demo.LABEL_WIDTH + 5]) == (255, 0, 0)  # before: the base's image
    assert tuple(grid[row, demo.LABEL_WIDTH + 2 * cell + cell // 2 + 5]) == (0, 0, 255)  # after: the adapter's
    table = demo.figures_table(
        {"in_context": 0.0, "subject": 0.0, "prompt": 0.8, "class_accuracy": 0.9},
        {"in_context": 0.6, "subject": 0.7, "prompt": 0.8, "class_accuracy": 0.85},
    )
    lines = table.splitlines()
    assert lines[1].startswith("subject in new contexts") and lines[1].split()[-2:] == ["0.00", "0.60"]
    assert lines[-1].startswith("drift") and lines[-1].split()[-1] == "+0.05"
