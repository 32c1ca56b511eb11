"""Flux.2 [klein] 4B / 9B: the Flux.2 transformer, smaller, with a Qwen3 text encoder and no guidance input.

Facts from diffusers' Flux2KleinPipeline and examples/dreambooth/train_dreambooth_lora_flux2_klein.py: the
latents, packing, 4-axis position ids, timestep / 1000 and reference-image tokens are Flux.2's (flux2.py);
the prompt is one user turn of Qwen3's chat template (thinking off), and the embeddings are the hidden
states of layers 9, 18 and 27 stacked per token, (B, 512, 3 x hidden); the transformer has no guidance
embedding (`guidance_embeds` false: Klein uses real classifier-free guidance at inference, and the script
passes guidance only to a transformer that has the input); the reference defaults are Flux.2's (rank 4,
lr 1e-4, uniform timesteps, its target list over Klein's 20 / 24 single blocks). The 4B and 9B
checkpoints share the transformer class with Flux.2 [dev]; the config (no guidance input) or the
pipeline class tells them apart. The released "base" checkpoints (FLUX.2-klein-base-4B/9B) are the
undistilled ones meant for fine-tuning; the 4-step distilled ones share their transformer config, so no
caveat is raised for them (their pipeline's `is_distilled` flag is not read here).
"""

from __future__ import annotations

import dataclasses

from personalize.models.families.flux2 import FLUX2, FLUX2_DEV

KLEIN_4B = {  # black-forest-labs/FLUX.2-klein-4B transformer/config.json
    **FLUX2_DEV,
    "num_layers": 5,
    "num_single_layers": 20,
    "num_attention_heads": 24,
    "joint_attention_dim": 7680,  # 3 x Qwen3-4B's 2560
    "guidance_embeds": False,
}
KLEIN_9B = {  # black-forest-labs/FLUX.2-klein-9B transformer/config.json
    **KLEIN_4B,
    "num_layers": 8,
    "num_single_layers": 24,
    "num_attention_heads": 32,
    "joint_attention_dim": 12288,  # 3 x Qwen3-8B's 4096
}

FLUX2_KLEIN = dataclasses.replace(
    FLUX2,
    name="flux2-klein",
    pipeline_class="Flux2KleinPipeline",
    tiny_names=("tiny-flux2-klein",),
    matches=lambda config: "timestep_guidance_channels" in config and not config.get("guidance_embeds", True),
    guidance_scale=None,  # no guidance input
    encoder_parameters=4.02e9 + 84e6,  # Qwen3-4B + the VAE (the 9B's Qwen3-8B holds 8.19e9: planned low there)
    defaults_source="diffusers' train_dreambooth_lora_flux2_klein.py defaults (rank 4, lr 1e-4, uniform timesteps; "
    "targets to_q/k/v/out.0 + the single blocks' to_qkv_mlp_proj and attn.to_out) and README_flux2.md (500 steps)",
    published={
        "black-forest-labs/FLUX.2-klein-4B": KLEIN_4B,
        "black-forest-labs/FLUX.2-klein-base-4B": KLEIN_4B,
        "black-forest-labs/FLUX.2-klein-9B": KLEIN_9B,
        "black-forest-labs/FLUX.2-klein-base-9B": KLEIN_9B,
    },
)
