"""Real processes (slow): two gloo ranks under torchrun, and a run killed after a checkpoint then resumed."""

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .conftest import CAT

BIN = Path(sys.executable).parent


def _env(cache_dir):
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PERSONALIZE_CACHE": str(cache_dir)}


def _two_ranks(cache_dir, *args):
    """`torchrun --nproc_per_node 2 -m personalize ARGS` to completion; skipped where torchrun is missing."""
    torchrun = shutil.which("torchrun", path=str(BIN)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun not installed")
    command = [torchrun, "--nproc_per_node", "2", "-m", "personalize", *args]
    done = subprocess.run(command, env=_env(cache_dir), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("done in") == 1  # only the main process reports and writes


def _train_args(out, steps, *more):
    return ["train", "--images", str(CAT), "--preset", "tiny", "--steps", str(steps), "--output", str(out)] + [
        "--set",
        "validation_steps=1",
        "--set",
        "validation_images=1",
        *more,
    ]


@pytest.mark.slow
def test_two_process_torchrun_on_cpu_writes_one_output(tmp_path, cache_dir):
    out = tmp_path / "ddp"
    _two_ranks(cache_dir, *_train_args(out, 4, "--checkpoint-every", "2"))
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    step = out / "checkpoints" / "step-000004"
    assert {path.name for path in step.iterdir()} == {
        "state.safetensors",
        "rng-rank0.safetensors",
        "rng-rank1.safetensors",
    }


def _kill_after_first_checkpoint(command, cache_dir, out):
    """Start a training run, SIGKILL it once its step-2 checkpoint exists; it must not have finished."""
    process = subprocess.Popen(command, env=_env(cache_dir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (out / "checkpoints" / "step-000002").is_dir() and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (out / f"{out.name}.safetensors").exists(), "the run finished before it could be killed"


@pytest.mark.slow
def test_killed_process_resumes_to_the_uninterrupted_adapter(tmp_path, cache_dir):
    python = [sys.executable, "-m", "personalize"]
    steps = 12
    reference = tmp_path / "reference"
    subprocess.run([*python, *_train_args(reference, steps)], env=_env(cache_dir), check=True, capture_output=True)
    out = tmp_path / "killed"
    _kill_after_first_checkpoint([*python, *_train_args(out, steps, "--checkpoint-every", "2")], cache_dir, out)
    resumed = subprocess.run(
        [*python, *_train_args(out, steps, "--checkpoint-every", "2", "--resume")],
        env=_env(cache_dir),
        capture_output=True,
        text=True,
    )
    assert resumed.returncode == 0 and "resuming from" in resumed.stdout, resumed.stderr[-2000:]
    expected = load_file(str(reference / "pytorch_lora_weights.safetensors"))
    final = load_file(str(out / "pytorch_lora_weights.safetensors"))
    for key, value in expected.items():
        torch.testing.assert_close(final[key], value, rtol=0, atol=1e-6, msg=key)


@pytest.mark.slow
def test_two_process_torchrun_llm_run_writes_one_peft_adapter(tmp_path, cache_dir):
    """The LLM recipe under two gloo ranks: each trains on its share of the batches, one writes."""
    data = tmp_path / "qa.jsonl"
    rows = [f'{{"prompt": "what is {n} plus one?", "completion": "{n + 1}"}}' for n in range(8)]
    data.write_text("\n".join(rows) + "\n")
    out = tmp_path / "llm"
    args = ["train", "--model", "tiny-llama", "--data", str(data), "--steps", "3", "--output", str(out)]
    args += ["--checkpoint-every", "3", "--set", "max_new_tokens=1"]
    _two_ranks(cache_dir, *args)
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()
    step = out / "checkpoints" / "step-000003"
    assert {"rng-rank0.safetensors", "rng-rank1.safetensors"} <= {path.name for path in step.iterdir()}
