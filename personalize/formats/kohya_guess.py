"""kohya module names -> diffusers module paths WITHOUT a model (for `convert` and `inspect`).

kohya names replace every "." by "_", and many identifiers contain "_" themselves, so the split is
ambiguous. A vocabulary of the multi-word identifiers of SD / SDXL / DiT UNets and CLIP text encoders
resolves it (longest match first); SGM block names (`input_blocks_4_1_...`) are mapped through the
released SDXL UNet's block map. With a model at hand, `kohya.name_table` is exact and preferred.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from personalize.errors import UserError
from personalize.formats.sdxl_names import block_map, from_sgm

WORDS = [
    "down_blocks",
    "up_blocks",
    "mid_block",
    "transformer_blocks",
    "single_transformer_blocks",
    "to_q",
    "to_k",
    "to_v",
    "to_out",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
    "proj_in",
    "proj_out",
    "proj_mlp",
    "time_emb_proj",
    "conv_shortcut",
    "conv_in",
    "conv_out",
    "conv_norm_out",
    "time_embedding",
    "linear_1",
    "linear_2",
    "add_embedding",
    "text_model",
    "self_attn",
    "q_proj",
    "k_proj",
    "v_proj",
    "out_proj",
    "layer_norm1",
    "layer_norm2",
    "final_layer_norm",
    "token_embedding",
    "position_embedding",
    "input_blocks",
    "output_blocks",
    "middle_block",
    "in_layers",
    "out_layers",
    "emb_layers",
    "skip_connection",
    "time_embed",
    "label_emb",
    "ff_context",
    "norm_out",
    "norm1_context",
    "context_embedder",
    "x_embedder",
    "time_text_embed",
    "timestep_embedder",
    "guidance_embedder",
    "text_embedder",
    "pos_embed",
]
_BY_LENGTH = sorted({tuple(w.split("_")) for w in WORDS}, key=len, reverse=True)
PREFIXES = (
    ("lora_unet_", "unet"),
    ("lora_transformer_", "transformer"),
    ("lora_te1_", "text_encoder"),
    ("lora_te2_", "text_encoder_2"),
    ("lora_te3_", "text_encoder_3"),
    ("lora_te_", "text_encoder"),
    ("lycoris_", "unet"),
)


def dotted(name: str) -> str:
    """ "down_blocks_0_attentions_0_to_out_0" -> "down_blocks.0.attentions.0.to_out.0"."""
    tokens, parts, i = name.split("_"), [], 0
    while i < len(tokens):
        word = next((w for w in _BY_LENGTH if tuple(tokens[i : i + len(w)]) == w), (tokens[i],))
        parts.append("_".join(word))
        i += len(word)
    return ".".join(parts)


def guess_path(name: str, unet_config: Mapping[str, Any] | None = None) -> tuple[str, str]:
    """kohya module name -> (component, diffusers module path); CLIP paths without `text_model.`."""
    for prefix, component in PREFIXES:
        if name.startswith(prefix):
            path = dotted(name[len(prefix) :])
            if component.startswith("text_encoder"):
                return component, path.removeprefix("text_model.")
            if path.split(".")[0] in (
                "input_blocks",
                "middle_block",
                "output_blocks",
                "time_embed",
                "label_emb",
                "out",
            ):
                path = from_sgm(path, block_map(unet_config)) or path
            return component, path
    raise UserError(f"'{name}' does not start with a kohya prefix (lora_unet_, lora_te_, lora_te1_, ...)")
