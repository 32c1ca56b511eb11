"""The mini DreamBench: its world, its measures' calibration, and the default preset on its pretrained base."""

import numpy as np
import pytest

from benchmarks.dreambench_mini import measures, world


def test_world_is_deterministic_and_captioned():
    first = world.world_sample(np.random.default_rng(5))
    second = world.world_sample(np.random.default_rng(5))
    assert np.array_equal(first[0], second[0]) and first[1] == second[1]
    assert first[0].shape == (32, 32, 3) and first[0].dtype == np.uint8


@pytest.mark.parametrize("subject", list(world.SUBJECTS))
def test_measures_are_calibrated(subject):
    scores = measures.calibrate(subject, seeds=3)
    assert scores["perfect"] == {"subject": 1.0, "prompt": 1.0, "in_context": 1.0, "class_accuracy": 1.0}
    assert scores["instance photos"]["subject"] == 1.0 and scores["instance photos"]["in_context"] == 0.0
    assert scores["class, no subject"]["subject"] == 0.0 and scores["class, no subject"]["prompt"] == 1.0
    assert scores["noise"]["in_context"] == 0.0


def test_parse_reads_a_rendered_scene():
    rng = np.random.default_rng(0)
    scene = world.random_scene(rng, shape="cone", colour="orange", context="at night", size="big")
    parsed = measures.parse(world.render(scene, rng))
    assert (parsed.shape, parsed.colour, parsed.context, parsed.subject) == ("cone", "orange", "at night", None)
    assert measures.size_of(parsed) == "big"
    subject = measures.parse(world.subject_images("box", count=1)[0])
    assert subject.subject == "box" and subject.context == "in a room"
