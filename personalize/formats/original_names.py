"""diffusers module paths <-> a model's original checkpoint names, for the single-file (kohya) layout.

ComfyUI keys some DiT layers by their original names only: all of Wan (`blocks.0.self_attn.q`, diffusers
`blocks.0.attn1.to_q`), Flux.2's shared modulations and embedders, Chroma's approximator. Its loader maps
`lora_unet_<original name, . -> _>` onto every model (musubi-tuner's Wan files are written so), so those
layers are written that way and the others keep the family's diffusers-path prefix. A family lists its
renames as `single_file_renames` (FamilyDescription): (diffusers template, original template) pairs,
`{}` standing for a block index; a path no pair matches keeps its diffusers name. Checked against
ComfyUI's own loader by `python -m benchmarks.comfy_keys`.
"""

from __future__ import annotations

import re
from functools import cache

PREFIX = "lora_unet"  # ComfyUI maps lora_unet_<its own module name> for every model
Renames = tuple[tuple[str, str], ...]


def _pattern(template: str) -> re.Pattern[str]:
    return re.compile(re.escape(template).replace(re.escape("{}"), r"(\d+)"))


@cache
def _compiled(renames: Renames, backward: bool) -> tuple[tuple[re.Pattern[str], str], ...]:
    if backward:  # matched on the kohya form, where every "." is already "_"
        return tuple((_pattern(original.replace(".", "_")), diffusers) for diffusers, original in renames)
    return tuple((_pattern(diffusers), original) for diffusers, original in renames)


def _rename(rules: tuple[tuple[re.Pattern[str], str], ...], name: str) -> str | None:
    for pattern, template in rules:
        match = pattern.fullmatch(name)
        if match is not None:
            return template.format(*match.groups())
    return None


def original_name(renames: Renames, path: str) -> str | None:
    """ "blocks.3.attn1.to_q" -> "blocks.3.self_attn.q"; None when the path keeps its diffusers name."""
    return _rename(_compiled(renames, False), path)


def kohya_name(renames: Renames, path: str) -> str | None:
    """ "blocks.3.attn1.to_q" -> "lora_unet_blocks_3_self_attn_q"; None when no rename applies."""
    original = original_name(renames, path)
    return None if original is None else f"{PREFIX}_{original.replace('.', '_')}"


def diffusers_path(renames: Renames, name: str) -> str | None:
    """ "lora_unet_blocks_3_self_attn_q" -> "blocks.3.attn1.to_q", exactly (the inverse of kohya_name)."""
    head = f"{PREFIX}_"
    return _rename(_compiled(renames, True), name[len(head) :]) if name.startswith(head) else None
