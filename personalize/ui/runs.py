"""Reading what runs left in their folders: loss, samples, adapter files, model card, eval figures.

Only files the trainers write are read (trainers/common/run.py RUN_FILES): the UI shows runs, it never
interprets training. While a run is going, its loss comes from the training progress line in the job's
log (one per step: the queue sets TQDM_MININTERVAL=0); once metrics.json exists, from there.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

# tqdm's line: "training:  40%|####  | 4/10 [00:01<00:02,  2.0it/s, loss=0.1234, lr=1.00e-03]"
PROGRESS = re.compile(r"training:[^\r\n]*?(\d+)/(\d+) \[[^\]\r\n]*?loss=([-+0-9.eEnaif]+)")
RUN_MARKERS = ("config.yaml", "metrics.json", "checkpoints")
STATE_DIR = ".personalize-ui"  # the UI's own files under the root (jobs, logs, upload staging)


def is_run(folder: Path) -> bool:
    return any((folder / marker).exists() for marker in RUN_MARKERS)


def list_runs(root: Path, depth: int = 3) -> list[Path]:
    """Run folders under root (newest first), not looking inside runs or the UI's own folder."""
    found: list[Path] = []

    def walk(folder: Path, level: int) -> None:
        for child in sorted(folder.iterdir()) if folder.is_dir() else []:
            if not child.is_dir() or child.is_symlink() or child.name.startswith("."):
                continue
            if is_run(child):
                found.append(child)
            elif level < depth:
                walk(child, level + 1)

    walk(root, 1)
    return sorted(found, key=lambda path: path.stat().st_mtime, reverse=True)


def metrics(run: Path) -> dict[str, Any]:
    try:
        return json.loads((run / "metrics.json").read_text())
    except (OSError, ValueError):
        return {}


def losses_from_log(text: str) -> list[tuple[int, float]]:
    """(step, loss) of every training progress line in a log, the last value per step kept."""
    by_step: dict[int, float] = {}
    for step, _total, value in PROGRESS.findall(text):
        try:
            by_step[int(step)] = float(value)
        except ValueError:
            continue
    return sorted((step, loss) for step, loss in by_step.items() if step > 0 and math.isfinite(loss))


def losses(run: Path, log: Path | None = None) -> list[tuple[int, float]]:
    """The loss per optimizer step: metrics.json of a finished or stopped run, else the live log."""
    saved = metrics(run).get("losses")
    live = losses_from_log(log.read_text(errors="replace")) if log is not None and log.is_file() else []
    if saved and len(saved) >= len(live):
        return [(step, float(loss)) for step, loss in enumerate(saved, start=1)]
    return live


def samples(run: Path) -> list[Path]:
    """The sample grids, in step order (samples/step-000010.png ...)."""
    return sorted((run / "samples").glob("*.png")) if (run / "samples").is_dir() else []


def adapter_files(run: Path) -> list[Path]:
    """What a user downloads: the adapter weights plus the files that say how to load them."""
    names = sorted(run.glob("*.safetensors")) + [run / "adapter_config.json", run / "config.yaml", run / "README.md"]
    return [path for path in names if path.is_file()]


def model_card(run: Path) -> str:
    try:
        return (run / "README.md").read_text(errors="replace")
    except OSError:
        return ""


def eval_figures(run: Path) -> tuple[dict[str, Any], list[Path], str]:
    """`personalize eval`'s OUT/eval/: (eval.json, its PNG figures, its Markdown table); empty without one."""
    folder = run / "eval"
    try:
        figures = json.loads((folder / "eval.json").read_text())
    except (OSError, ValueError):
        return {}, [], ""
    tables = sorted(folder.glob("*.md"))
    table = tables[0].read_text(errors="replace") if tables else ""
    return figures, sorted(folder.glob("*.png")), table
