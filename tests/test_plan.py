"""The memory planner (personalize/plan.py): arithmetic it must get right, the CLI, and (slow) its estimate
against the measured peak RSS of real training runs on random-init Flux / SD3 architectures of several sizes."""

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


def test_cpu_loading_phase_counts_the_bf16_copy_and_one_fp32_tensor(tmp_path):
    """On a CPU a bf16 run casts the fp32 transformer one tensor at a time from its files (cast_from_files)."""
    from personalize.models import build_tiny
    from personalize.plan import CPU_RUNTIME

    build_tiny("tiny-flux").save_pretrained(tmp_path / "flux")
    n = sum(p.numel() for p in build_tiny("tiny-flux").transformer.parameters())
    bf16 = plan(str(tmp_path / "flux"), Settings(resolution=32), "cpu")
    idle = bf16.parts["idle encoders (resident copies)"]  # bf16 copies of fp32 files cannot be remapped
    peak = done = 0  # in file order: the bf16 copies so far + this tensor in fp32 + its copy
    for tensor in build_tiny("tiny-flux").transformer.state_dict().values():
        peak, done = max(peak, done + 6 * tensor.numel()), done + 2 * tensor.numel()
    assert done == 2 * n and bf16.loading == pytest.approx(CPU_RUNTIME + idle + peak) and bf16.peak >= bf16.loading
    fp32 = plan(str(tmp_path / "flux"), Settings(resolution=32, mixed_precision="no"), "cpu")
    assert fp32.loading == CPU_RUNTIME and "idle encoders (resident copies)" not in fp32.parts  # remapped
    assert plan(str(tmp_path / "flux"), Settings(resolution=32), "cuda").loading == 0  # only the copy on a GPU
    nf4 = plan(str(tmp_path / "flux"), Settings(resolution=32, quantize="nf4"), "cpu")
    assert nf4.loading == CPU_RUNTIME + idle  # read one weight at a time


def test_sd3_position_table_is_a_frozen_weight(tmp_path):
    """SD3's sin-cos table is a buffer (0.9 GB fp32 at SD3.5 medium's pos_embed_max_size 384): it sits on the
    device with the weights. (Loading does not compute it: personalize.models.position_tables.)"""
    from personalize.models import build_tiny

    transformer = build_tiny("tiny-sd3").transformer
    table = transformer.pos_embed.pos_embed.numel()
    n = sum(p.numel() for p in transformer.parameters())
    estimate = plan("tiny-sd3", Settings(resolution=32, mixed_precision="no"), "cuda")
    assert estimate.parts["frozen weights (fp32)"] == 4 * (n + table)
    # on a CPU, fp32 weights stay in their file's memory map and a step reads only its crop of the table
    build_tiny("tiny-sd3").save_pretrained(tmp_path)
    mapped = plan(str(tmp_path), Settings(resolution=32, mixed_precision="no"), "cpu")
    assert mapped.parts["frozen weights (fp32)"] == 4 * n
    cast = plan(str(tmp_path), Settings(resolution=32), "cpu")  # the bf16 cast reads (and copies) all of it
    assert cast.parts["frozen weights (bf16)"] == 2 * (n + table)


@pytest.mark.slow
@pytest.mark.parametrize(
    "case",
    ["flux-512:no", "flux-1024:no:ckpt", "flux-1024:no:nf4", "sd3-768:no", "sd3-768:no:ckpt", "flux-1024:bf16:load"],
)
def test_planned_peak_is_within_20_percent_of_the_measured_rss(tmp_path_factory, case):
    """A real `personalize train` run (random-init build, 256 px, 2 steps) in a child process: its ru_maxrss.
    bf16 stops at the first training forward (':load', the planned loading phase): without AVX512-BF16 a CPU
    multiplies bf16 matrices about 100x slower than fp32, and the run would take hours."""
    from benchmarks.plan_check import Case, check

    row = check(Case.parse(case), tmp_path_factory.getbasetemp() / "plan-builds")
    print(f"{case}: planned {row['planned'] / GB:.2f} GB, measured {row['peak'] / GB:.2f} GB, {row['error']:+.1%}")
    assert abs(row["error"]) <= 0.20


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
