"""Optimizers and the LR schedule: AdamW (torch), 8-bit AdamW (bitsandbytes), Prodigy (prodigyopt)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from personalize.errors import UserError


def check_optimizer(name: str) -> None:
    """Fail before any model loading or caching when the optimizer's package is missing."""
    needs = {
        "adamw8bit": ("bitsandbytes", "pip install 'personalize[quant]'"),
        "prodigy": ("prodigyopt", "pip install prodigyopt"),
    }
    if name not in ("adamw", *needs):
        raise UserError(f"unknown optimizer '{name}'; choose adamw, adamw8bit or prodigy")
    if name in needs:
        import importlib.util

        package, install = needs[name]
        if importlib.util.find_spec(package) is None:
            raise UserError(f"--optimizer {name} needs {package}: {install}, or use --optimizer adamw")


def build_optimizer(
    name: str,
    groups: Sequence[dict[str, Any]],
    *,
    lr: float,
    betas: Sequence[float] = (0.9, 0.999),
    weight_decay: float = 1e-2,
    eps: float = 1e-8,
) -> torch.optim.Optimizer:
    """`groups`: torch param groups ({"params": [...], "lr": ...}); a group without lr gets `lr`."""
    betas = (float(betas[0]), float(betas[1]))
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)
    if name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UserError(
                "--optimizer adamw8bit needs bitsandbytes: pip install 'personalize[quant]', or use --optimizer adamw"
            ) from None
        return bnb.optim.AdamW8bit(groups, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)
    if name == "prodigy":
        try:
            from prodigyopt import Prodigy
        except ImportError:
            raise UserError(
                "--optimizer prodigy needs prodigyopt: pip install prodigyopt, or use --optimizer adamw"
            ) from None
        return Prodigy(groups, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)
    raise UserError(f"unknown optimizer '{name}'; choose adamw, adamw8bit or prodigy")


def build_lr_scheduler(name: str, optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int) -> Any:
    """diffusers' schedules: linear warm-up for `warmup_steps`, then `name` until `total_steps`."""
    from diffusers.optimization import get_scheduler

    if name == "constant" and warmup_steps > 0:
        name = "constant_with_warmup"  # diffusers' plain "constant" ignores the warm-up
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps)
