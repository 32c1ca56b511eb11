"""The flow-matching recipe in real processes (slow): two gloo ranks under torchrun, and a killed run resumed."""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from .conftest import CAT
from .test_processes import _env, _kill_after_first_checkpoint, _two_ranks


def _flow_args(out, steps, model="tiny-flux", *more):
    args = ["train", "--images", str(CAT), "--model", model, "--resolution", "32", "--steps", str(steps)]
    return [*args, "--output", str(out), "--set", "validation_steps=1", "--set", "validation_images=1", *more]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny-flux", "tiny-sd3"])
def test_two_process_torchrun_flow_run_writes_one_output(tmp_path, cache_dir, model):
    out = tmp_path / "ddp"
    _two_ranks(cache_dir, *_flow_args(out, 4, model, "--checkpoint-every", "2"))
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    step = out / "checkpoints" / "step-000004"
    assert {"rng-rank0.safetensors", "rng-rank1.safetensors"} <= {path.name for path in step.iterdir()}


@pytest.mark.slow
def test_killed_flux_run_resumes_to_the_uninterrupted_adapter(tmp_path, cache_dir):
    python = [sys.executable, "-m", "personalize"]
    steps, more = 12, ["--checkpoint-every", "2", "--set", "validation_images=0"]
    reference = tmp_path / "reference"
    done = subprocess.run(
        [*python, *_flow_args(reference, steps, "tiny-flux", *more)], env=_env(cache_dir), capture_output=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    out = tmp_path / "killed"
    _kill_after_first_checkpoint([*python, *_flow_args(out, steps, "tiny-flux", *more)], cache_dir, out)
    resumed = subprocess.run(
        [*python, *_flow_args(out, steps, "tiny-flux", *more, "--resume")],
        env=_env(cache_dir),
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0 and "resuming from" in resumed.stdout, resumed.stderr[-2000:]
    expected = load_file(str(reference / "pytorch_lora_weights.safetensors"))
    final = load_file(str(out / "pytorch_lora_weights.safetensors"))
    for key, value in expected.items():
        torch.testing.assert_close(final[key], value, rtol=0, atol=1e-6, msg=key)
