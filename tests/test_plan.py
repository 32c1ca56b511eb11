"""The memory planner (personalize/plan.py): arithmetic it must get right, the CLI, and (slow) its estimate
against the measured peak RSS of real training runs on random-init Flux / SD3 architectures of several sizes."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from personalize.cli import main
from personalize.plan import GB, Settings, fit, parse_size, plan

CAT = Path(__file__).resolve().parent.parent / "examples" / "cat"
FLUX = "black-forest-labs/FLUX.1-dev"


def test_sizes_parse_and_settings_move_the_parts_as_they_should():
    assert parse_size("16GB") == 16 * GB and parse_size("12 GiB") == 12 * GB and parse_size("800MB") == 800 * 1024**2
    base = plan("tiny-flux", Settings(resolution=32, mixed_precision="no"))
    assert base.parts["frozen weights (fp32)"] == 4 * sum(
        p.numel()
        for p in __import__("personalize.models", fromlist=["x"]).build_tiny("tiny-flux").transformer.parameters()
    )
    bf16 = plan("tiny-flux", Settings(resolution=32))
    assert bf16.parts["frozen weights (bf16)"] == base.parts["frozen weights (fp32)"] / 2
    checkpointed = plan("tiny-flux", Settings(resolution=32, gradient_checkpointing=True))
    assert checkpointed.parts["activations (with checkpointing)"] < bf16.parts["activations (without checkpointing)"]
    larger = plan("tiny-flux", Settings(resolution=64))
    assert larger.parts["activations (without checkpointing)"] > bf16.parts["activations (without checkpointing)"]
    double = plan("tiny-flux", Settings(resolution=32, rank=8))
    assert double.parts["trained weights (fp32)"] == pytest.approx(2 * bf16.parts["trained weights (fp32)"])
    adam8 = plan("tiny-flux", Settings(resolution=32, optimizer="adamw8bit"))
    assert adam8.parts["optimizer states (adamw8bit)"] == bf16.parts["optimizer states (adamw)"] / 4


def test_fit_takes_the_cheapest_savings_or_says_what_is_closest():
    from personalize.errors import UserError

    settings = Settings(resolution=64, mixed_precision="no")
    full = plan("tiny-sd3", settings).peak
    estimate, applied = fit("tiny-sd3", settings, full * 0.9)
    assert estimate.peak <= full * 0.9 and applied == ["bf16 frozen base"]  # the cheapest saving that is enough
    with pytest.raises(UserError, match="nothing fits 0 GB: the closest"):
        fit("tiny-sd3", settings, 1000.0)


def test_plan_cli_prints_parts_and_fits(capsys):
    assert main(["plan", "--model", "tiny-sd3", "--resolution", "64"]) == 0
    printed = capsys.readouterr().out
    assert "frozen weights (bf16)" in printed and "caching phase" in printed and "peak" in printed
    assert main(["plan", "--model", "tiny-sd3", "--resolution", "64", "--vram", "1GB"]) == 0
    assert "personalize train --model tiny-sd3" in capsys.readouterr().out
    assert main(["plan", "--model", "tiny-sd3", "--resolution", "64", "--vram", "0.0001GB"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: nothing fits") and len(err.splitlines()) == 1


def test_train_vram_applies_the_plan(capsys, tmp_path):
    argv = ["train", "--images", str(CAT), "--model", "tiny-flux", "--resolution", "32", "--steps", "1"]
    argv += ["--output", str(tmp_path / "out"), "--set", "validation_images=0", "--vram", "0.0001GB"]
    assert main(argv) == 2
    assert "nothing fits" in capsys.readouterr().err and not (tmp_path / "out").exists()
    assert main([*argv[:-1], "8GB"]) == 0
    assert "--vram 8GB" in capsys.readouterr().out


@pytest.mark.slow
def test_published_flux_plans_its_real_size_and_fits_16gb_with_nf4():
    bf16 = plan(FLUX, Settings(resolution=512, rank=16))
    assert 11.5e9 * 2 < bf16.parts["frozen weights (bf16)"] < 12.2e9 * 2  # FLUX.1-dev's 11.9 B parameters
    estimate, applied = fit(FLUX, Settings(resolution=1024, rank=16), 16 * GB)
    assert estimate.peak <= 16 * GB and "NF4 frozen transformer" in applied


SIZES = {  # (family builder, overrides): widths from 512 to 1536, a few blocks
    "flux-512": ("flux", {"num_attention_heads": 4, "joint_attention_dim": 1024}, 1, 2),
    "flux-1024": ("flux", {"num_attention_heads": 8, "joint_attention_dim": 2048}, 2, 2),
    "flux-1536": ("flux", {"num_attention_heads": 12}, 1, 2),
    "sd3-768": ("sd3", {"num_attention_heads": 12, "caption_projection_dim": 768, "pos_embed_max_size": 96}, 2, 0),
}


def _measured_peak(folder, *flags):
    """Peak RSS of `personalize train` on `folder` in a child process (its own ru_maxrss)."""
    env = {**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1"}
    code = (
        "import resource, sys; from personalize.cli import main; code = main(sys.argv[1:]); "
        "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(code)"
    )
    argv = ["train", "--images", str(CAT), "--model", str(folder), "--resolution", "256", "--steps", "2"]
    argv += ["--rank", "4", "--output", str(folder) + "-out", "--set", "validation_images=0", *flags]
    done = subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.split("PEAK")[-1].split()[0]) * 1024


@pytest.mark.slow
@pytest.mark.parametrize(
    ("size", "flags"),
    [("flux-512", []), ("flux-1024", []), ("flux-1536", []), ("flux-1024", ["--mixed-precision", "bf16"])]
    + [("flux-1024", ["--gradient-checkpointing"]), ("sd3-768", [])],
)
def test_planned_peak_is_within_20_percent_of_the_measured_rss(tmp_path_factory, size, flags):
    from personalize.models.tiny_flow import reduced_flux, reduced_sd3

    family, overrides, layers, single = SIZES[size]
    folder = tmp_path_factory.mktemp("plan") / size
    pipe = reduced_flux(layers, single, **overrides) if family == "flux" else reduced_sd3(layers, **overrides)
    pipe.save_pretrained(folder)
    del pipe
    measured = _measured_peak(folder, *flags)
    settings = Settings(
        resolution=256,
        rank=4,
        mixed_precision="bf16" if "bf16" in flags else "no",
        gradient_checkpointing="--gradient-checkpointing" in flags,
    )
    planned = plan(str(folder), settings, "cpu").peak
    error = (planned - measured) / measured
    print(f"{size} {' '.join(flags)}: planned {planned / GB:.2f} GB, measured {measured / GB:.2f} GB, {error:+.1%}")
    assert abs(error) <= 0.20


@pytest.mark.gpu
@pytest.mark.slow
@pytest.mark.parametrize("flags", [{}, {"gradient_checkpointing": True}, {"quantize": "nf4"}])
def test_planned_peak_is_within_20_percent_of_cuda_max_memory_allocated(tmp_path, flags):
    import torch

    from personalize.models.tiny_flow import reduced_flux
    from personalize.trainers import train

    folder = tmp_path / "flux"
    reduced_flux(1, 2, num_attention_heads=8).save_pretrained(folder)
    torch.cuda.reset_peak_memory_stats()
    options = dict(resolution=512, steps=2, rank=4, mixed_precision="bf16", validation_images=0, **flags)
    train(images=str(CAT), model=str(folder), output=str(tmp_path / "out"), checkpoint_every=0, **options)
    measured = torch.cuda.max_memory_allocated()
    settings = Settings(resolution=512, rank=4, mixed_precision="bf16", **flags)
    planned = plan(str(folder), settings, "cuda").peak
    print(f"{flags}: planned {planned / GB:.2f} GB, measured {measured / GB:.2f} GB")
    assert abs(planned - measured) <= 0.20 * measured


def test_a_unet_model_is_one_line_not_a_crash(capsys):
    from personalize.cli import main

    assert main(["plan", "--model", "tiny-sd15"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: cannot plan for tiny-sd15") and len(err.strip().splitlines()) == 1
