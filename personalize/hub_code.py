"""Importing personalize never downloads or runs code from the Hugging Face Hub.

Why: bitsandbytes >= 0.50 registers its CPU backend when it is imported, and on a CPU with
AVX512-BF16 it then calls `kernels.get_kernel("kernels-community/quantization-bitsandbytes")`.
diffusers, transformers and peft import bitsandbytes whenever it is installed, so merely loading a
pipeline would fetch and execute remote code (online) or print warnings (offline).

We wrap `kernels.get_kernel` the moment the `kernels` package is imported (a meta-path finder, so
`import personalize` does not import it itself) with a refusal; bitsandbytes then falls back to its
own compiled CPU kernels. `PERSONALIZE_HUB_KERNELS=1` lifts the guard for users who want the faster
Hub kernel and trust its publisher.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

ALLOW_ENV = "PERSONALIZE_HUB_KERNELS"


class HubCodeRefused(RuntimeError):
    """A library asked for code from the Hub while the guard is on."""


def refuse_hub_kernels(get_kernel: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap `kernels.get_kernel`: refuse unless PERSONALIZE_HUB_KERNELS=1 at call time."""

    def guarded_get_kernel(repo_id: str, *args: Any, **kwargs: Any) -> Any:
        if os.environ.get(ALLOW_ENV) == "1":
            return get_kernel(repo_id, *args, **kwargs)
        raise HubCodeRefused(f"personalize does not fetch code from the Hub ({repo_id}); set {ALLOW_ENV}=1 to allow")

    guarded_get_kernel.__wrapped__ = get_kernel  # type: ignore[attr-defined]
    return guarded_get_kernel


class _GuardKernelsOnImport(importlib.abc.MetaPathFinder):
    """Finds `kernels` as usual, then wraps its `get_kernel` right after the module runs."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != "kernels":
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run_module = spec.loader.exec_module

        def exec_and_guard(module: ModuleType) -> None:
            run_module(module)
            if hasattr(module, "get_kernel"):
                module.get_kernel = refuse_hub_kernels(module.get_kernel)

        spec.loader.exec_module = exec_and_guard  # type: ignore[method-assign]
        return spec


def install() -> None:
    """Guard `kernels.get_kernel`, whether `kernels` is already imported or not (idempotent)."""
    loaded = sys.modules.get("kernels")
    if loaded is not None:
        if hasattr(loaded, "get_kernel") and not hasattr(loaded.get_kernel, "__wrapped__"):
            loaded.get_kernel = refuse_hub_kernels(loaded.get_kernel)
        return
    if not any(isinstance(finder, _GuardKernelsOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _GuardKernelsOnImport())
