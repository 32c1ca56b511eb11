"""Wan text-to-video pipelines built in code: the real layout, random weights, a fixed seed.

- `tiny_wan()` (`--model tiny-wan`): Wan 2.1's layout (patch (1, 2, 2), RMS QK norm across heads, cross-
  attention norm, UMT5 text encoder, the causal 3D VAE with 4x temporal and 8x spatial compression and
  Wan's per-channel latent mean / std) at test width: two heads of 16, one block; for the offline tests.
- `reduced_wan(layers, variant)`: the published transformer config (Wan2.1-T2V-1.3B by default: 12 heads x
  128, feed-forward 8960, UMT5 width 4096) at `layers` blocks, for the planner check and the benchmarks;
  the text encoder is a one-layer UMT5 of the real width, the VAE a narrow one of the real structure.

Both are stock `WanPipeline`s with the released scheduler (UniPC on flow sigmas, flow_shift 3.0);
`save_pretrained` + `from_pretrained` reload them.
"""

from __future__ import annotations

from typing import Any

from personalize.models.families import FLOW_FAMILIES
from personalize.models.tiny_diffusion import _seeded
from personalize.models.tiny_flow import _t5


def _vae(base_dim: int) -> Any:
    from diffusers import AutoencoderKLWan

    # the Wan 2.1 VAE's structure (z_dim 16, dim_mult 1-2-4-4, temporal downsampling in the last two
    # stages) and its released latents_mean / latents_std (AutoencoderKLWan's defaults), narrow
    return AutoencoderKLWan(base_dim=base_dim, z_dim=16, num_res_blocks=1, temperal_downsample=[False, True, True])


def _scheduler() -> Any:
    from diffusers import UniPCMultistepScheduler

    # Wan2.1-T2V's released scheduler config (480p: flow_shift 3.0)
    return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)


def _pipeline(config: dict[str, Any], vae_base: int, text_tokens: int) -> Any:
    from diffusers import WanPipeline, WanTransformer3DModel

    config = {k: v for k, v in config.items() if not k.startswith("_")}
    text_encoder, tokenizer = _t5(config["text_dim"], text_tokens, d_kv=8, umt5=True)  # Wan's UMT5
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=_vae(vae_base),
        scheduler=_scheduler(),
        transformer=WanTransformer3DModel(**config),
    )


@_seeded
def tiny_wan() -> Any:
    """Wan 2.1 T2V layout at test width (2 heads x 16, one block, UMT5 width 32)."""
    real = FLOW_FAMILIES["wan"].published["Wan-AI/Wan2.1-T2V-1.3B-Diffusers"]
    small = dict(num_attention_heads=2, attention_head_dim=16, text_dim=32, freq_dim=32, ffn_dim=32, num_layers=1)
    return _pipeline({**real, **small, "rope_max_seq_len": 32}, vae_base=4, text_tokens=512)


def reduced_wan(layers: int = 1, variant: str = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", **overrides: Any) -> Any:
    """A WanPipeline with `variant`'s transformer config at `layers` blocks (real width)."""

    @_seeded
    def build() -> Any:
        config = {**FLOW_FAMILIES["wan"].published[variant], **overrides, "num_layers": layers}
        return _pipeline(config, vae_base=8, text_tokens=512)

    return build()
