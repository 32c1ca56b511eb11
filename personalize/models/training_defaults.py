"""Training defaults a base model folder carries: `training_defaults.json` beside its model_index.json.

A base whose maker measured what trains it best can say so, and a no-flags `personalize train` on it
starts from that instead of the SD1.5-derived defaults (the shipped `dreambench-mini` world model does:
benchmarks/results/dreambench_mini.md has the evidence). The file is a JSON object shaped like a
run's config.yaml, e.g. `{"method": "full", "lr": 1e-4, "steps": 1000, "data": {"bucket_step": 16}}`
("_why" keys are notes); it applies only when the run names no method of its own (a method chosen by
flag, preset or config file keeps the tool's defaults for that method), and every option the run sets
wins over it. Hub ids and single files carry none.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from personalize.errors import UserError
from personalize.models.world import resolve_model

FILE = "training_defaults.json"


def training_defaults(model: str) -> dict[str, Any]:
    """The options `model`'s folder recommends, nested as in config.yaml ({} for anything without the file)."""
    try:
        folder = Path(resolve_model(model)).expanduser()
    except UserError:  # dreambench-mini not built yet: the model load says so, once
        return {}
    path = folder / FILE
    if not path.is_file():
        return {}
    try:
        defaults = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise UserError(f"{path} is not valid JSON ({error.msg}, line {error.lineno}); fix or delete it") from None
    if not isinstance(defaults, dict):
        raise UserError(f'{path} must hold a JSON object of training options, e.g. {{"lr": 1e-4}}')
    return {key: value for key, value in defaults.items() if not key.startswith("_")}  # "_why": a note


def under_model_defaults(options: dict[str, Any], default_model: str) -> dict[str, Any]:
    """`options` (nested as in config.yaml) on top of their base model's defaults, when they name no method."""
    if "method" in options:
        return options
    from personalize.config import merge

    return merge(training_defaults(str(options.get("model") or default_model)), options)
