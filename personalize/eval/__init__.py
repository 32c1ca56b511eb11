"""personalize.eval: does a trained adapter work? Subject fidelity, prompt fidelity, language drift.

    from personalize.eval import EvalSettings, evaluate
    result = evaluate("out/cat", EvalSettings(prompts="dreambench", seeds=4))

metrics.py holds the math (pure functions), embedders.py the DINO/CLIP models, prompts.py the prompt
sets, run.py the generation and scoring, report.py the files.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from personalize.eval.run import EvalImages, EvalResult, EvalSettings, evaluate, generate_images, score

__all__ = ["EvalImages", "EvalResult", "EvalSettings", "evaluate", "generate_images", "score"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        import importlib

        return getattr(importlib.import_module("personalize.eval.run"), name)
    raise AttributeError(f"module 'personalize.eval' has no attribute '{name}'")
