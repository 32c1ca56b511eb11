"""Loading SD3 without building a position table the weights replace a moment later.

diffusers' PatchEmbed (SD3 / SD3.5) computes its sin-cos position table when the model is constructed, in
float64 with its sin and cos halves alive at once: 4x the fp32 table at the peak, 3.6 GB of CPU memory for
SD3.5 medium (pos_embed_max_size 384, width 1536; the fp32 table is 0.9 GB). With pos_embed_max_size set the
table is a persistent buffer, so `from_pretrained` loads it from the weight files right after and the computed
one is thrown away. Inside `lazy_position_tables()` such a table starts as an empty (untouched, so not
resident) tensor instead; a table the files did not provide is computed afterwards as before.

    with lazy_position_tables() as built:
        pipe = DiffusionPipeline.from_pretrained(folder)
        built.fill_missing(pipe)
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch


class _Tables:
    """The placeholder tables made inside the context, to find any the weights did not replace."""

    def __init__(self) -> None:
        self.placeholders: list[tuple[torch.Tensor, tuple[Any, ...], dict[str, Any]]] = []

    def fill_missing(self, *roots: Any) -> None:
        """Compute the real table for every module that still holds a placeholder (weights without it)."""
        from diffusers.models.embeddings import get_2d_sincos_pos_embed

        for root in roots:
            modules = root.components.values() if hasattr(root, "components") else [root]
            for component in modules:
                if not isinstance(component, torch.nn.Module):
                    continue
                for module in component.modules():
                    table = getattr(module, "pos_embed", None)
                    for placeholder, args, kwargs in self.placeholders:
                        if table is not None and torch.is_tensor(table) and table.data_ptr() == placeholder.data_ptr():
                            real = get_2d_sincos_pos_embed(*args, **kwargs).float().unsqueeze(0)
                            module.register_buffer("pos_embed", real.to(table.dtype), persistent=True)


@contextmanager
def lazy_position_tables() -> Iterator[_Tables]:
    """Inside: a PatchEmbed with pos_embed_max_size (a table its weights hold) builds an empty table."""
    from diffusers.models import embeddings

    tables = _Tables()
    original_init = embeddings.PatchEmbed.__init__
    compute = embeddings.get_2d_sincos_pos_embed

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        if not kwargs.get("pos_embed_max_size"):  # a table built for the input size, not stored: compute it
            original_init(self, *args, **kwargs)
            return

        def empty(embed_dim: int, grid_size: Any, *more: Any, **options: Any) -> torch.Tensor:
            rows, cols = grid_size if isinstance(grid_size, tuple) else (grid_size, grid_size)
            table = torch.empty(rows * cols, embed_dim)  # (grid^2, width), fp32, pages untouched
            tables.placeholders.append((table, (embed_dim, grid_size, *more), options))
            return table

        embeddings.get_2d_sincos_pos_embed = empty
        try:
            original_init(self, *args, **kwargs)
        finally:
            embeddings.get_2d_sincos_pos_embed = compute
        if self.pos_embed is not None:  # .float().unsqueeze(0) of an fp32 table is a view: the same storage
            tables.placeholders[-1] = (self.pos_embed, *tables.placeholders[-1][1:])

    embeddings.PatchEmbed.__init__ = init
    try:
        yield tables
    finally:
        embeddings.PatchEmbed.__init__ = original_init
