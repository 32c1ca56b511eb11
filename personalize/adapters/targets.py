"""Which layers `targets` selects: a preset name, exact paths or '.'-boundary suffixes, or a full regex.

Never a substring match: "to_q" selects `...attn1.to_q` but not `...to_q_extra`; a regex must match the
whole path. Only layers an adapter can wrap (Linear incl. bitsandbytes, Conv2d, Embedding) are
candidates, and a selection that matches nothing is an error that names the nearest layers.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Sequence

from torch import nn

from personalize.errors import UserError
from personalize.models.presets import all_preset_names, preset_patterns

WRAPPABLE = (nn.Linear, nn.Conv2d, nn.Embedding)
_PLAIN_NAME = re.compile(r"[\w.]+")


def wrappable_paths(model: nn.Module) -> list[str]:
    """Paths of the layers an adapter can wrap; a wrapped layer counts once (not its insides).

    Walks the module tree in `named_modules` order but never descends into a wrapped layer, so the
    cost does not grow with the number of adapters already attached."""
    from personalize.adapters.layer import AdapterLayer

    paths: list[str] = []
    seen: set[int] = set()

    def visit(module: nn.Module, prefix: str) -> None:
        for name, child in module._modules.items():
            if child is None or id(child) in seen:
                continue
            seen.add(id(child))
            path = f"{prefix}.{name}" if prefix else name
            if isinstance(child, (AdapterLayer, *WRAPPABLE)):
                paths.append(path)
            if not isinstance(child, AdapterLayer):
                visit(child, path)

    visit(model, "")
    return paths


def _base(module: nn.Module) -> nn.Module:
    return module._modules.get("base_layer", module) if type(module).__name__ == "AdapterLayer" else module


def _matches(path: str, target: str) -> bool:
    if _PLAIN_NAME.fullmatch(target):
        return path == target or path.endswith("." + target)
    return re.fullmatch(target, path) is not None


def select(model: nn.Module, targets: str | Sequence[str]) -> list[str]:
    """Module paths of `model` selected by `targets` (see the module doc)."""
    candidates = wrappable_paths(model)
    if isinstance(targets, str) and targets in all_preset_names():
        patterns = preset_patterns(model, targets)
        # presets name projection layers; token embeddings are only wrapped when asked for by path
        candidates = [p for p in candidates if not isinstance(_base(model.get_submodule(p)), nn.Embedding)]
    elif isinstance(targets, str):
        patterns = [targets]
    else:
        patterns = list(targets)
    for pattern in patterns:
        if not _PLAIN_NAME.fullmatch(pattern):
            try:
                re.compile(pattern)
            except re.error as error:
                raise UserError(f"target '{pattern}' is not a valid regex ({error})") from None
    chosen = [path for path in candidates if any(_matches(path, pattern) for pattern in patterns)]
    if not chosen:
        hints = sorted({near for p in patterns for near in difflib.get_close_matches(p, candidates, n=3, cutoff=0.3)})
        shown = ", ".join(hints or candidates[:5])
        raise UserError(
            f"targets {patterns if len(patterns) > 1 else patterns[0]!r} match no Linear/Conv2d/Embedding layer of "
            f"{type(model).__name__}; nearest layers: {shown}"
        )
    return chosen
