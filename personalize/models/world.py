"""`dreambench-mini`: the small pretrained text-to-image model of the mini DreamBench world.

A Stable-Diffusion-architecture pipeline (UNet, VAE, CLIP text encoder) pretrained from scratch on the
procedural world of benchmarks/dreambench_mini/ (coloured balls, boxes and cones in named contexts,
16 px) by `python -m benchmarks.dreambench_mini.pretrain`. Unlike the random-weight tiny models, it
learned to draw what its prompt says, so a personalization run on it can be judged (and the demo shows it).

`--model dreambench-mini` finds the folder in this order: $PERSONALIZE_WORLD_MODEL, the copy shipped in
a source checkout (benchmarks/dreambench_mini/model), the pretraining script's output
(benchmarks/.cache/dreambench-mini), ~/.cache/personalize/dreambench-mini.
"""

from __future__ import annotations

import os
from pathlib import Path

from personalize.errors import UserError

WORLD_MODEL = "dreambench-mini"
_REPO = Path(__file__).resolve().parents[2]


def world_model_candidates() -> list[Path]:
    candidates = [Path(os.environ["PERSONALIZE_WORLD_MODEL"])] if os.environ.get("PERSONALIZE_WORLD_MODEL") else []
    candidates += [
        _REPO / "benchmarks" / "dreambench_mini" / "model",
        _REPO / "benchmarks" / ".cache" / "dreambench-mini",
        Path.home() / ".cache" / "personalize" / "dreambench-mini",
    ]
    return candidates


def world_model_folder() -> Path:
    """The folder of the pretrained world model; one line saying how to build it when there is none."""
    for folder in world_model_candidates():
        if (folder / "model_index.json").is_file():
            return folder
    raise UserError(
        f"the {WORLD_MODEL} model is not here; build it from a source checkout with "
        "`python -m benchmarks.dreambench_mini.pretrain` (~1 h on a CPU core), or set PERSONALIZE_WORLD_MODEL"
    )


def resolve_model(model: str) -> str:
    """`dreambench-mini` -> its folder; any other name unchanged."""
    return str(world_model_folder()) if model == WORLD_MODEL else model
