"""`personalize generate`: images, a grid, and metadata that reproduces each image."""

import numpy as np
import pytest
from PIL import Image

from personalize.cli import main
from personalize.images import read_png_settings


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_generate_writes_images_grid_and_metadata(tmp_path, capsys):
    out = tmp_path / "images"
    argv = ["generate", "--model", "tiny-sd15", "--prompt", "a photo of a cat", "--steps", "2", "--seed", "5"]
    assert main([*argv, "--num-images", "2", "--output", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    assert [p.split("/")[-1] for p in printed] == ["000_seed5.png", "001_seed6.png", "grid.png"]
    first = read_png_settings(out / "000_seed5.png")
    assert first["prompt"] == "a photo of a cat" and first["seed"] == 5 and first["steps"] == 2
    assert (first["width"], first["height"]) == (64, 64)
    assert Image.open(out / "grid.png").size == (2 * 64 + 2, 64)
    # the second image, regenerated alone from its recorded seed, is the same image
    single = tmp_path / "again.png"
    assert main([*argv[:-1], "6", "--output", str(single)]) == 0
    assert np.array_equal(pixels(single), pixels(out / "001_seed6.png"))
    assert not np.array_equal(pixels(out / "000_seed5.png"), pixels(out / "001_seed6.png"))


def test_generate_with_a_scheduler_on_sdxl_and_flux(tmp_path):
    assert (
        main(
            [
                "generate",
                "--model",
                "tiny-sdxl",
                "--prompt",
                "a cat",
                "--steps",
                "2",
                "--scheduler",
                "euler-a",
                "--output",
                str(tmp_path / "xl.png"),
            ]
        )
        == 0
    )
    assert Image.open(tmp_path / "xl.png").size == (64, 64)
    assert (
        main(
            [
                "generate",
                "--model",
                "tiny-flux",
                "--prompt",
                "a cat",
                "--steps",
                "2",
                "--width",
                "32",
                "--height",
                "32",
                "--output",
                str(tmp_path / "flux.png"),
            ]
        )
        == 0
    )
    assert read_png_settings(tmp_path / "flux.png")["model"] == "tiny-flux"


def test_flow_model_refuses_a_ddpm_scheduler(tmp_path, capsys):
    argv = ["generate", "--model", "tiny-flux", "--prompt", "x", "--scheduler", "ddim", "--output", str(tmp_path)]
    assert main(argv) == 2
    assert "does not fit this model" in capsys.readouterr().err


def test_one_file_output_with_many_images_is_a_user_error(tmp_path, capsys):
    argv = [
        "generate",
        "--model",
        "tiny-sd15",
        "--prompt",
        "x",
        "--steps",
        "1",
        "--num-images",
        "2",
        "--output",
        str(tmp_path / "one.png"),
    ]
    assert main(argv) == 2
    assert "pass a folder" in capsys.readouterr().err
    assert not (tmp_path / "one.png").exists()


@pytest.mark.parametrize("scheduler", ["pndm", "ddim", "ddpm", "euler", "euler-a", "dpm++", "dpm++-karras", "unipc"])
def test_every_scheduler_generates_with_few_steps(tmp_path, scheduler):
    """Each scheduler runs at 1 and 3 steps (PNDM's PRK warm-up needed 4 and crashed with a broadcast error)."""
    for steps in ("1", "3"):
        out = tmp_path / f"{scheduler}-{steps}.png"
        argv = ["generate", "--model", "tiny-sd15", "--prompt", "a cat", "--steps", steps, "--scheduler", scheduler]
        assert main([*argv, "--output", str(out)]) == 0
        assert Image.open(out).size == (64, 64)
