"""Evaluation figures for the batch table, when `personalize eval` is installed in this version.

The batch never depends on it: `figures(OUT)` reads `OUT/eval/eval.json` if a run wrote one (a job with
the train key that runs the evaluation, or `personalize batch --eval`), and `run_evaluation` calls the
evaluation's Python API only when it exists; otherwise it says in one line that it is not available.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

from personalize.errors import UserError

EVAL_FILE = Path("eval") / "eval.json"
SETTINGS = ("seeds", "steps", "guidance")  # numbers in eval.json's figures that describe the run, not the adapter


def available() -> bool:
    try:
        module = importlib.import_module("personalize.eval")
    except ImportError:
        return False
    return callable(getattr(module, "evaluate", None))


def figures(output: str | Path) -> dict[str, float] | None:
    """The headline numbers of OUT/eval/eval.json ({metric: value}), or None when there is none."""
    try:
        data = json.loads((Path(output) / EVAL_FILE).read_text())
    except (OSError, ValueError):
        return None
    summary = data.get("figures", data) if isinstance(data, dict) else {}
    numbers = {
        key: float(value)
        for key, value in summary.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in SETTINGS
    }
    return numbers or None


def run_evaluation(pipe: Any, output: str | Path) -> None:
    """`personalize.eval.evaluate(OUT, pipe=...)` on a finished job with its default settings (it writes
    OUT/eval/eval.json and leaves the pipeline as it was)."""
    if not available():
        raise UserError("--eval needs `personalize eval`, which this version does not have; run without --eval")
    module = importlib.import_module("personalize.eval")
    module.evaluate(str(output), pipe=pipe)
