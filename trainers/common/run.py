"""The start of every training run: a clean accelerator, the notes, the seed, the checkpoint to resume.

Shared by the diffusion recipes (DreamBooth, Textual Inversion, conditioning) and the LLM/VLM recipe;
`config` is any of their configs (mixed_precision, grad_accum, seed, output, resume).
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch

from personalize.errors import UserError

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}  # --mixed-precision -> compute dtype


def cpu_only() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return not torch.cuda.is_available() and not (mps is not None and mps.is_available())


class RunStart(NamedTuple):
    accelerator: Any
    say: Any
    output: Path
    checkpoint_root: Path
    resume_from: Path | None


def start_run(config: Any, notes: list[str]) -> RunStart:
    """What every recipe does first: a clean accelerator, the notes, the seed, the checkpoint to resume."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed

    # A script may train many subjects in one process with different precisions; accelerate keeps its
    # settings in a process-wide singleton, so start each run from a clean one (the process group stays).
    AcceleratorState._reset_state()
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.grad_accum,
        cpu=cpu_only(),  # lets torchrun's gloo ranks form one CPU process group (MULTI_CPU)
    )
    say = printer(accelerator)
    if config.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise UserError("--mixed-precision fp16 needs a GPU; on a CPU use --mixed-precision bf16 or no")
    for note in notes:
        say(f"note: {note}")
    set_seed(config.seed)
    output = Path(config.output)
    checkpoint_root = output / "checkpoints"
    return RunStart(
        accelerator, say, output, checkpoint_root, checkpoint_to_resume(config, checkpoint_root, accelerator, say)
    )


def printer(accelerator: Any) -> Any:
    def say(message: str) -> None:
        if accelerator.is_main_process:
            print(message, flush=True)

    return say


def checkpoint_to_resume(config: Any, root: Path, accelerator: Any, say: Any) -> Path | None:
    from personalize.trainers.common.checkpoints import latest_checkpoint, list_checkpoints

    if config.resume:
        latest = latest_checkpoint(root)
        if latest is None:
            say(f"--resume: no checkpoint in {root} yet; starting from step 0")
        return latest
    old = list_checkpoints(root)
    if old and accelerator.is_main_process:
        say(f"starting over: removing {len(old)} old checkpoint(s) in {root} (pass --resume to continue them)")
        for path in old:
            shutil.rmtree(path, ignore_errors=True)
    accelerator.wait_for_everyone()
    return None


def begin_training(accelerator: Any, state: Any, resume_from: Path | None, config: Any, output: Path, say: Any) -> None:
    """Restore the checkpoint to resume (if any) into `state`, and write OUT/config.yaml, which reruns the run."""
    from personalize.config import save_yaml
    from personalize.trainers.common.loop import load_checkpoint

    if resume_from is not None:
        load_checkpoint(accelerator, state, resume_from)
        say(f"resuming from {resume_from} (step {state.step} of {config.steps})")
    output.mkdir(parents=True, exist_ok=True)
    if accelerator.is_main_process:
        save_yaml(config, output / "config.yaml", header="# personalize train --config config.yaml")


def run_metrics(state: Any, seconds: float) -> dict[str, Any]:
    """What every recipe reports (and metrics.json holds): final loss, steps, loop seconds, trainable count."""
    return {
        "final_loss": state.losses[-1] if state.losses else float("nan"),
        "steps": state.step,
        "seconds": seconds,
        "trainable_params": sum(param.numel() for param in state.named_params.values()),
    }


class PhaseClock:
    """Seconds per phase of a run, in order: `mark(name)` closes the phase that began at the previous mark.

    The recipe's metrics (and metrics.json) carry them as `phases`; `personalize batch` adds them up per job.
    """

    def __init__(self) -> None:
        self.last = time.perf_counter()
        self.seconds: dict[str, float] = {}

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self.last
        self.last = now
