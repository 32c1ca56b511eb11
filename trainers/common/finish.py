"""The end of a diffusion run, after the adapter is saved: the model card, metrics.json, the file list,
and `--eval` on the saved output (scored as a user loads it).

Shared by the DreamBooth, Textual Inversion and flow-matching recipes, so that every run ends alike.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from personalize.trainers.common.run import write_metrics


def write_run_files(
    output: Path,
    card: str,
    files: list[Path],
    samples: list[Path],
    metrics: dict[str, Any],
    state: Any,
    say: Callable[[str], None],
    done: str,
) -> list[Path]:
    """Write OUT/README.md (the card) and OUT/metrics.json, print `done` and every file; return the files."""
    (output / "README.md").write_text(card)
    files = [*files, output / "README.md", output / "config.yaml", write_metrics(output, metrics, state)]
    say(f"{done}; wrote:")
    for path in files + samples[-1:]:
        say(f"  {path}")
    return files


def evaluate_output(
    accelerator: Any, output: Path, config: Any, state: Any, metrics: dict[str, Any], say: Callable[[str], None]
) -> None:
    """`--eval`: score the saved output (personalize.eval) into metrics["eval"], metrics.json and the trackers.
    Skipped for a run stopped early (its adapter is not the one the user asked for)."""
    if not (config.eval and accelerator.is_main_process and not state.stopped_early):
        return
    from personalize.eval import EvalSettings, evaluate, logs

    device = str(accelerator.device)
    settings = EvalSettings(prompts=config.eval, seed=config.seed, steps=config.validation_steps, device=device)
    evaluation = evaluate(output, settings, say=say)
    metrics["eval"] = evaluation.figures
    write_metrics(output, metrics, state)
    numbers = {f"eval/{key}": value for key, value in evaluation.figures.items() if isinstance(value, float)}
    logs.log_values(accelerator, numbers, state.step)
    logs.log_image(accelerator, "eval/contact_sheet", evaluation.files[-1], state.step)
