"""The memory planner on Qwen-Image (1 and 2.1), Z-Image, HiDream-I1, Krea 2 and the edit families: published sizes
(fast) and, slow, the estimate against the measured peak RSS of `personalize train` on reduced-depth builds of each
(within 20 %)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from personalize.plan import GB, Settings, plan


def plan_family(model):
    from personalize.plan import model_config

    return model_config(model)[0]


CAT = Path(__file__).resolve().parent.parent / "examples" / "cat"

PUBLISHED = {  # hub id -> transformer parameters in billions (from the released model cards)
    "Qwen/Qwen-Image": (19.5, 21.0),
    "Tongyi-MAI/Z-Image-Turbo": (5.9, 6.4),
    "HiDream-ai/HiDream-I1-Full": (16.5, 17.5),
}


def test_qwen_image21_by_hub_id_plans_its_mask_built_sequence_on_its_16x_vae(capsys):
    """No download: the 16x VAE is the family's; the meta-device trace follows 2.1's sequence, which is built from
    the image-slot mask's values (personalize.meta_trace): a 1024 px picture is 64 x 64 = 4096 tokens, 16 x fewer
    activations at 256 px (one fourth of the tokens per side squared), and `--vram` picks settings that fit."""
    from personalize.cli import main
    from personalize.plan import vae_factors

    assert vae_factors("Qwen/Qwen-Image-2.1", plan_family("Qwen/Qwen-Image-2.1")) == (16, 1)
    sizes = [
        plan("Qwen/Qwen-Image-2.1", Settings(resolution=side, mixed_precision="bf16")).parts for side in (256, 1024)
    ]
    small, large = (parts["activations (without checkpointing)"] for parts in sizes)
    assert 12 < large / small < 20  # tokens x 16 (+ the fixed 64 text tokens, attention on the math kernel: none)
    assert main(["plan", "--model", "Qwen/Qwen-Image-2.1", "--vram", "24GB"]) == 0
    assert "fits" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("model", list(PUBLISHED))
def test_published_models_plan_their_real_size_without_any_download(model):
    low, high = PUBLISHED[model]
    estimate = plan(model, Settings(resolution=256, mixed_precision="no"))
    parameters = estimate.parts["frozen weights (fp32)"] / 4
    assert low * 1e9 < parameters < high * 1e9


def test_plan_of_each_tiny_family_runs_on_the_meta_device():
    for model in ("tiny-qwen-image", "tiny-qwen-image21", "tiny-z-image", "tiny-hidream", "tiny-krea2"):
        estimate = plan(model, Settings(resolution=32))
        assert estimate.peak > 0 and estimate.parts["activations (without checkpointing)"] > 0


def _measured_peak(folder, *flags, images=CAT):
    """Peak RSS of `personalize train` on `folder` in a child process (its own ru_maxrss)."""
    env = {**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1"}
    code = (
        "import resource, sys; from personalize.cli import main; code = main(sys.argv[1:]); "
        "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(code)"
    )
    argv = ["train", "--images", str(images), "--model", str(folder), "--resolution", "256", "--steps", "2"]
    argv += ["--rank", "4", "--output", str(folder) + "-out", "--set", "validation_images=0", *flags]
    done = subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-2000:]
    return int(done.stdout.split("PEAK")[-1].split()[0]) * 1024


BUILDS = {  # family -> (builder, arguments): a few blocks, 8-16 heads of 128 (widths 1024-2048)
    "qwen-image": ("reduced_qwen_image", dict(layers=2, heads=12, text_width=256)),
    "z-image": ("reduced_z_image", dict(layers=2, refiner_layers=1, heads=12, text_width=256)),
    "hidream": ("reduced_hidream", dict(layers=1, single_layers=2, heads=8, text_width=256)),
    "krea2": ("reduced_krea2", dict(layers=2, heads=8, text_width=256)),
    "qwen-image-21": ("reduced_qwen_image21", dict(layers=2, heads=12, text_width=256)),
}


@pytest.mark.slow
@pytest.mark.parametrize("family", list(BUILDS))
def test_planned_peak_is_within_20_percent_of_the_measured_rss(tmp_path_factory, family):
    from personalize.models import tiny_flow_more

    builder, arguments = BUILDS[family]
    folder = tmp_path_factory.mktemp("plan") / family
    getattr(tiny_flow_more, builder)(**arguments).save_pretrained(folder)
    measured = _measured_peak(folder)
    planned = plan(str(folder), Settings(resolution=256, rank=4, mixed_precision="no"), "cpu").peak
    error = (planned - measured) / measured
    print(f"{family}: planned {planned / GB:.2f} GB, measured {measured / GB:.2f} GB, {error:+.1%}")
    assert abs(error) <= 0.20


@pytest.mark.slow
@pytest.mark.parametrize(
    "preset",
    [
        "qwen-image-lora-16gb",
        "qwen-image-lora-24gb",
        "qwen-image21-lora-24gb",
        "z-image-lora-16gb",
        "z-image-lora-24gb",
        "krea2-lora-16gb",
        "krea2-lora-24gb",
    ],
)
def test_family_presets_fit_the_card_they_name(preset):
    from personalize import config
    from personalize.models.families import described_family

    values = config.read_preset(preset)
    family = described_family(values["model"])
    assert family is not None and values["targets"] in family.targets
    settings = Settings(
        rank=values["rank"],
        targets=values["targets"],
        resolution=values["data"]["resolution"],
        batch_size=values["batch_size"],
        quantize=values.get("quantize", ""),
        gradient_checkpointing=values["gradient_checkpointing"],
    )
    card = int(preset.rsplit("-", 1)[1].removesuffix("gb"))
    assert plan(values["model"], settings).peak <= card * GB


def test_an_edit_run_plans_the_source_tokens_and_the_encoders_it_keeps(capsys):
    """--task edit: the source's latents join the sequence (more activations), the VAE stays to encode sources,
    and Qwen-Image-Edit's text encoder too (its prompt reads the source picture); a model that cannot edit is
    one line, exit 2."""
    from personalize.cli import main
    from personalize.plan import _tiny

    for model, text_encoder_kept in (("tiny-flux-kontext", False), ("tiny-qwen-image-edit", True)):
        plain, edit = (plan(model, Settings(resolution=256, edit=edit)).parts for edit in (False, True))
        key = "activations (without checkpointing)"
        assert 1.2 < edit[key] / plain[key] < 2.5
        kept = edit["encoders kept for edit pairs"]
        vae = sum(p.numel() for p in _tiny(model).vae.parameters()) * 4
        assert (kept > vae) if text_encoder_kept else kept == vae
        assert "encoders kept for edit pairs" not in plain
    assert main(["plan", "--model", "tiny-flux-kontext", "--task", "edit", "--resolution", "256"]) == 0
    assert "encoders kept for edit pairs" in capsys.readouterr().out
    assert main(["plan", "--model", "tiny-flux", "--task", "edit"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: tiny-flux is a flux model, not an edit model") and len(err.splitlines()) == 1


EDIT_BUILDS = {  # edit family -> (builder module:function, arguments), as BUILDS
    "flux-kontext": ("personalize.models.tiny_flow2:reduced_pipeline", dict(name="tiny-flux-kontext", heads=8)),
    "qwen-image-edit": (
        "personalize.models.tiny_flow_more:reduced_qwen_image",
        dict(layers=2, heads=12, text_width=256, pipeline="QwenImageEditPipeline"),
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("family", list(EDIT_BUILDS))
def test_planned_peak_of_an_edit_run_is_within_20_percent_of_the_measured_rss(tmp_path, family):
    """`personalize train --task edit` on (source, target) pairs: the examples' cat photos as targets, their
    mirror images as sources."""
    import importlib

    from PIL import Image, ImageOps

    module, function = EDIT_BUILDS[family][0].split(":")
    folder = tmp_path / family
    getattr(importlib.import_module(module), function)(**EDIT_BUILDS[family][1]).save_pretrained(folder)
    targets, sources = tmp_path / "targets", tmp_path / "sources"
    targets.mkdir()
    sources.mkdir()
    for photo in sorted(CAT.glob("*.jpg"))[:3]:
        Image.open(photo).save(targets / photo.name)
        ImageOps.mirror(Image.open(photo)).save(sources / photo.name)
    measured = _measured_peak(folder, "--task", "edit", "--control", str(sources), images=targets)
    planned = plan(str(folder), Settings(resolution=256, rank=4, mixed_precision="no", edit=True), "cpu").peak
    error = (planned - measured) / measured
    print(f"{family} edit: planned {planned / GB:.2f} GB, measured {measured / GB:.2f} GB, {error:+.1%}")
    assert abs(error) <= 0.20
