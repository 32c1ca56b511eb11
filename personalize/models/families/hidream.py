"""HiDream-I1 (Full, Dev, Fast): a sparse-MoE DiT on CLIP-L/G pooled + T5 + every Llama-3.1 layer, Flux's VAE.

Facts from diffusers' HiDreamImagePipeline / HiDreamImageTransformer2DModel and examples/dreambooth/
train_dreambooth_lora_hidream.py: the pooled projections of two CLIPs (768 + 1280 = text_emb_dim 2048) add to
the timestep embedding; T5-XXL's last hidden state (128 tokens, padded) and every Llama-3.1-8B-Instruct hidden
state after the embeddings (32 x (B, 128, 4096)) are the text, and block i reads Llama layer llama_layers[i];
the transformer patchifies (B, 16, h, w) in 2x2 patches itself, builds its own ids, takes the raw timestep
(0..1000) and returns the negated velocity (prediction = -output); latents (x - shift) * scale of the Flux VAE;
the script trains attention q/k/v/out (image stream) with uniform timesteps ("none") on target = noise - x0,
from the scheduler's table with shift 3.0. The text cache stores the Llama states batch-first (B, 32, 128, D).
"""

from __future__ import annotations

from typing import Any

import torch

from personalize.models.families.description import Embeds, FamilyDescription

TEXT_TOKENS = 128  # HiDreamImagePipeline's max_sequence_length for T5 and Llama
ATTENTION = [r"(.*\.)?attn1\.(to_q|to_k|to_v|to_out)"]  # the reference script's default (image stream)
JOINT = [r"(.*\.)?attn1\.(to_q|to_k|to_v|to_out)(_t)?"]  # + the text stream of the double blocks
FEED_FORWARD = [r"(.*\.)?ff_(i|t)\.(shared_experts\.|experts\.\d+\.)?(w1|w2|w3)"]
ALL_LINEAR = [r"(double|single)_stream_blocks\.\d+\..*"]


def encode_prompt(pipe: Any, prompts: list[str]) -> Embeds:
    device = next(pipe.text_encoder_4.parameters()).device
    t5, _, llama, _, pooled, _ = pipe.encode_prompt(
        prompts, prompts, prompts, prompts, device=device, do_classifier_free_guidance=False
    )
    return {  # (B, 128, D_t5), (B, L, 128, D_llama), (B, P1 + P2)
        "prompt_embeds": t5,
        "prompt_embeds_llama3": llama.transpose(0, 1),
        "pooled_prompt_embeds": pooled,
    }


def inference_output(transformer: torch.nn.Module) -> None:
    """As the reference script loads it (`force_inference_output=True`): in training mode too, the MoE layers
    route as at inference (no auxiliary load-balancing loss) and the output is (B, C, h, w), not the
    training layout (B, C, tokens, 4). Idempotent; recorded in the config, as in the script's saved models."""
    model = getattr(transformer, "module", transformer)  # DDP
    if next(model.parameters()).is_meta:  # the planner: meta tensors cannot route as at inference (bincount)
        return
    if not model.config.force_inference_output:
        model.register_to_config(force_inference_output=True)
        for module in model.modules():
            if hasattr(module, "_force_inference_output"):
                module._force_inference_output = True


def predict(
    transformer: torch.nn.Module, noisy: torch.Tensor, timesteps: torch.Tensor, embeds: Embeds, guidance: float | None
) -> torch.Tensor:
    inference_output(transformer)
    output = transformer(
        hidden_states=noisy,  # (B, C, h, w)
        timesteps=timesteps,
        encoder_hidden_states_t5=embeds["prompt_embeds"],
        encoder_hidden_states_llama3=embeds["prompt_embeds_llama3"].transpose(0, 1),  # (L, B, 128, D)
        pooled_embeds=embeds["pooled_prompt_embeds"],
        return_dict=False,
    )[0]  # (B, C, h, w)
    return -output


HIDREAM_I1 = dict(
    _class_name="HiDreamImageTransformer2DModel",
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=16,
    num_single_layers=32,
    attention_head_dim=128,
    num_attention_heads=20,
    caption_channels=[4096, 4096],
    text_emb_dim=2048,
    num_routed_experts=4,
    num_activated_experts=2,
    axes_dims_rope=[64, 32, 32],
    max_resolution=[128, 128],
    llama_layers=list(range(32)) + [31] * 16,
)

HIDREAM = FamilyDescription(
    name="hidream",
    pipeline_class="HiDreamImagePipeline",
    transformer_class="HiDreamImageTransformer2DModel",
    text_encoders=("text_encoder", "text_encoder_2", "text_encoder_3", "text_encoder_4"),
    trainable_text_encoders=(),  # the reference trains the transformer only
    tiny_names=("tiny-hidream",),
    matches=lambda config: "llama_layers" in config and "caption_channels" in config,
    encode_prompt=encode_prompt,
    predict=predict,
    latent_multiple=lambda config: int(config.get("patch_size") or 2),
    latent_channels=lambda config: int(config.get("in_channels", 16)),
    weighting_scheme="none",
    precondition_outputs=False,
    guidance_scale=None,
    targets={
        "attention": ATTENTION,
        "joint-attention": JOINT,
        "attention+ff": JOINT + FEED_FORWARD,
        "all-linear": ALL_LINEAR,
    },
    default_targets="attention",
    defaults={"lora": (4, 1e-4, 500), "dora": (4, 1e-4, 500)},
    defaults_source="diffusers' train_dreambooth_lora_hidream.py defaults (rank 4, lr 1e-4, attention "
    "to_q/to_k/to_v/to_out, uniform timesteps) and README_hidream.md",
    full_precision=(r"(x_embedder|t_embedder|p_embedder|caption_projection|final_layer)\..*",),
    published={
        name: HIDREAM_I1
        for name in ("HiDream-ai/HiDream-I1-Full", "HiDream-ai/HiDream-I1-Dev", "HiDream-ai/HiDream-I1-Fast")
    },
    text_tokens=lambda config: 2 * TEXT_TOKENS,  # T5 + one Llama layer per block
    image_tokens=lambda config, h, w: (h // 2) * (w // 2),
    embed_keys=("prompt_embeds", "prompt_embeds_llama3", "pooled_prompt_embeds"),
    embed_shapes=lambda config: {
        "prompt_embeds": (TEXT_TOKENS, int(config["caption_channels"][0])),
        "prompt_embeds_llama3": (max(config["llama_layers"]) + 1, TEXT_TOKENS, int(config["caption_channels"][1])),
        "pooled_prompt_embeds": (int(config["text_emb_dim"]),),
    },
    block_pattern=r"(double|single)_stream_blocks\.\d+",
    single_file_prefix="lycoris",  # ComfyUI reads lycoris_<diffusers path> for this family (README)
    encoder_parameters=123e6 + 695e6 + 4762e6 + 8030e6 + 84e6,  # CLIP-L, CLIP-G, T5-XXL, Llama-3.1-8B, VAE
)
