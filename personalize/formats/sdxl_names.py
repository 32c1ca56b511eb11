"""diffusers UNet module paths <-> the original (SGM / LDM) block names that kohya uses for SDXL.

    down_blocks.i.resnets.j      <-> input_blocks.{1 + i*(L+1) + j}.0        (L = layers_per_block)
    down_blocks.i.attentions.j   <-> input_blocks.{1 + i*(L+1) + j}.1
    down_blocks.i.downsamplers.0.conv <-> input_blocks.{(i+1)*(L+1)}.0.op
    mid_block.resnets.0 / attentions.0 / resnets.1 <-> middle_block.0 / .1 / .2
    up_blocks.i.resnets.j        <-> output_blocks.{i*(L+1) + j}.0           (j <= L)
    up_blocks.i.attentions.j     <-> output_blocks.{i*(L+1) + j}.1
    up_blocks.i.upsamplers.0.conv <-> output_blocks.{i*(L+1) + L}.{2 if the block has attention else 1}.conv
    resnet: norm1 in_layers.0, conv1 in_layers.2, time_emb_proj emb_layers.1, norm2 out_layers.0,
            conv2 out_layers.3, conv_shortcut skip_connection; transformer internals keep their names.

The block map depends on the UNet config (layers_per_block, block types), so it is built from one; the
default is the released SDXL base UNet.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

SDXL_UNET_CONFIG: dict[str, Any] = {
    "layers_per_block": 2,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
}
_TOP = {
    "conv_in": "input_blocks.0.0",
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}


def block_map(config: Mapping[str, Any] | None = None) -> dict[str, str]:
    """diffusers block prefix -> SGM block prefix for a UNet config."""
    config = config or SDXL_UNET_CONFIG
    per_block = int(config["layers_per_block"])
    down, up = list(config["down_block_types"]), list(config["up_block_types"])
    blocks = dict(_TOP)
    for i, kind in enumerate(down):
        for j in range(per_block):
            index = 1 + i * (per_block + 1) + j
            blocks[f"down_blocks.{i}.resnets.{j}"] = f"input_blocks.{index}.0"
            if "CrossAttn" in kind:
                blocks[f"down_blocks.{i}.attentions.{j}"] = f"input_blocks.{index}.1"
        if i < len(down) - 1:
            blocks[f"down_blocks.{i}.downsamplers.0.conv"] = f"input_blocks.{(i + 1) * (per_block + 1)}.0.op"
    blocks["mid_block.resnets.0"] = "middle_block.0"
    blocks["mid_block.attentions.0"] = "middle_block.1"
    blocks["mid_block.resnets.1"] = "middle_block.2"
    for i, kind in enumerate(up):
        attention = "CrossAttn" in kind
        for j in range(per_block + 1):
            index = i * (per_block + 1) + j
            blocks[f"up_blocks.{i}.resnets.{j}"] = f"output_blocks.{index}.0"
            if attention:
                blocks[f"up_blocks.{i}.attentions.{j}"] = f"output_blocks.{index}.1"
        if i < len(up) - 1:
            slot = 2 if attention else 1
            blocks[f"up_blocks.{i}.upsamplers.0.conv"] = f"output_blocks.{i * (per_block + 1) + per_block}.{slot}.conv"
    return blocks


def to_sgm(path: str, blocks: Mapping[str, str]) -> str | None:
    """A diffusers UNet module path in SGM names; None when no block owns it."""
    for prefix in sorted(blocks, key=len, reverse=True):
        if path == prefix:
            return blocks[prefix]
        if path.startswith(prefix + "."):
            rest = path[len(prefix) + 1 :]
            if ".resnets." in prefix:
                rest = _RESNET.get(rest, rest)
            return f"{blocks[prefix]}.{rest}"
    return None


def from_sgm(path: str, blocks: Mapping[str, str]) -> str | None:
    """An SGM UNet module path in diffusers names (the inverse of `to_sgm`); None when no block owns it."""
    inverse = {sgm: diffusers for diffusers, sgm in blocks.items()}
    resnet_inverse = {sgm: diffusers for diffusers, sgm in _RESNET.items()}
    for prefix in sorted(inverse, key=len, reverse=True):
        if path == prefix:
            return inverse[prefix]
        if path.startswith(prefix + "."):
            rest = path[len(prefix) + 1 :]
            if ".resnets." in inverse[prefix]:
                rest = resnet_inverse.get(rest, rest)
            return f"{inverse[prefix]}.{rest}"
    return None
