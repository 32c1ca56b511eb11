"""The start of every training run: a clean accelerator, the notes, the seed, the checkpoint to resume.

Shared by the diffusion recipes (DreamBooth, Textual Inversion, conditioning) and the LLM/VLM recipe;
`config` is any of their configs (mixed_precision, grad_accum, seed, output, resume, overwrite).

Nothing a user made is lost: `start_run` only checks the output folder (it must not be a file or the
training data, and a finished or interrupted run there needs --overwrite or --resume); the previous
run's files are removed by `begin_training`, once the new run has loaded its model and data and the
loop is about to start, so a run that fails earlier leaves the folder as it was.
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
    check_output(output, config)
    checkpoint_root = output / "checkpoints"
    return RunStart(
        accelerator, say, output, checkpoint_root, checkpoint_to_resume(config, checkpoint_root, accelerator, say)
    )


def printer(accelerator: Any) -> Any:
    def say(message: str) -> None:
        if accelerator.is_main_process:
            print(message, flush=True)

    return say


# What a run writes into its output folder (trainers/common/outputs.py, the recipes' cards and samples);
# an --overwrite run removes exactly these, never class_images/ or anything else the user put there.
RUN_FILES = (
    "config.yaml",
    "config.json",
    "README.md",
    "metrics.json",
    "loss.png",
    "samples.txt",
    "*.safetensors",
    "adapter_config.json",
)
RUN_FOLDERS = (
    "checkpoints",
    "samples",
    "eval",
    "a1111",
    "unet",
    "transformer",
    "image_encoder",
    "text_encoder",
    "text_encoder_2",
)


def _training_inputs(config: Any) -> list[Path]:
    """The folders and files a run reads its examples from (images, class images, LLM data)."""
    data = getattr(config, "data", None)
    paths = [data] if isinstance(data, str) else [getattr(data, "images", None), getattr(data, "class_dir", None)]
    return [Path(path).expanduser().resolve() for path in paths if path]


def finished_run(output: Path) -> bool:
    """A run that reached its last step wrote metrics.json without `stopped_early`."""
    import json

    metrics = output / "metrics.json"
    try:
        return metrics.is_file() and not json.loads(metrics.read_text()).get("stopped_early", False)
    except (OSError, ValueError):
        return True  # unreadable: treat as finished, so that nothing is replaced without --overwrite


def check_output(output: Path, config: Any) -> None:
    """Refuse, before anything is loaded, an output that would destroy files: one line, exit 2."""
    if output.exists() and not output.is_dir():
        raise UserError(f"--output {output} is a file, not a folder; choose a folder for the run's files")
    resolved = output.expanduser().resolve()
    for source in _training_inputs(config):
        if source.is_dir() and (resolved == source or source in resolved.parents):
            raise UserError(
                f"--output {output} is inside the training data {source}; the run's files would be trained on "
                "next time: choose a folder outside it"
            )
    if config.resume or getattr(config, "overwrite", False):
        return
    from personalize.trainers.common.checkpoints import latest_checkpoint

    if finished_run(output):
        raise UserError(f"{output} holds a finished run; pass --overwrite to replace it, or choose another --output")
    latest = latest_checkpoint(output / "checkpoints")
    if latest is not None:
        raise UserError(
            f"{output} holds an unfinished run (checkpoint {latest.name}); pass --resume to continue it, "
            "--overwrite to start over, or choose another --output"
        )


def clear_previous_run(output: Path) -> list[Path]:
    """Remove what an earlier run wrote into `output` (RUN_FILES, RUN_FOLDERS); returns what went."""
    removed = [path for folder in RUN_FOLDERS if (path := output / folder).is_dir()]
    removed += sorted({path for pattern in RUN_FILES for path in output.glob(pattern) if path.is_file()})
    for path in removed:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    return removed


def checkpoint_to_resume(config: Any, root: Path, accelerator: Any, say: Any) -> Path | None:
    from personalize.trainers.common.checkpoints import latest_checkpoint

    if not config.resume:
        return None
    latest = latest_checkpoint(root)
    if latest is None:
        say(f"--resume: no checkpoint in {root} yet; starting from step 0")
    return latest


def begin_training(accelerator: Any, state: Any, resume_from: Path | None, config: Any, output: Path, say: Any) -> None:
    """The loop is about to start: restore the checkpoint to resume (if any) into `state`, or clear what an
    earlier run left in the output folder (--overwrite); then write OUT/config.yaml, which reruns the run."""
    from personalize.config import save_yaml
    from personalize.trainers.common.loop import load_checkpoint

    if resume_from is not None:
        load_checkpoint(accelerator, state, resume_from)
        say(f"resuming from {resume_from} (step {state.step} of {config.steps})")
    elif accelerator.is_main_process and output.is_dir() and not config.resume:
        removed = clear_previous_run(output)
        if removed:
            say(f"--overwrite: removed the previous run's {', '.join(path.name for path in removed)} from {output}")
    accelerator.wait_for_everyone()
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
        "stopped_early": state.stopped_early,  # Ctrl-C / SIGTERM: an unfinished run (continue with --resume)
    }


def write_metrics(output: Path, metrics: dict[str, Any], state: Any) -> Path:
    """OUT/metrics.json: the run's figures and the loss of every optimizer step (resumed runs included).
    Its presence (without `stopped_early`) is what marks a run as finished."""
    import json

    path = output / "metrics.json"
    path.write_text(json.dumps({**metrics, "losses": state.losses}, indent=1, default=str))
    return path


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
