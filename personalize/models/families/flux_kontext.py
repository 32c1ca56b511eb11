"""Flux Kontext (FLUX.1-Kontext-dev): Flux.1's transformer, edited images from (source, instruction) pairs.

Facts from diffusers' FluxKontextPipeline and examples/dreambooth/train_dreambooth_lora_flux_kontext.py:
the transformer, text encoders, VAE, packing, timestep / 1000, guidance input (3.5) and objective are
Flux.1-dev's (flux.py); for an edit the source image's latents, scaled like the target's, are packed
into 2x2 tokens of their own and appended after the noisy tokens, with position ids whose first channel
is 1 (the generated image's is 0); the prediction of the appended tokens is dropped before the loss.
The checkpoint's transformer config equals FLUX.1-dev's, so Kontext is told apart by its pipeline class
(a bare config matches Flux first: FLOW_FAMILIES lists Flux before Kontext).
"""

from __future__ import annotations

import dataclasses

from personalize.models.families import flux
from personalize.models.families.description import FamilyDescription

FLUX_KONTEXT = dataclasses.replace(
    flux.FLUX,
    name="flux-kontext",
    pipeline_class="FluxKontextPipeline",
    tiny_names=("tiny-flux-kontext",),
    predict_edit=flux.predict,  # flux.predict appends `reference` tokens at position index 1
    defaults_source="diffusers' train_dreambooth_lora_flux_kontext.py defaults (rank 4, lr 1e-4, guidance 3.5, "
    "uniform timesteps, attention + feed-forward targets)",
    distilled=lambda config: None,
    encoder_parameters=123e6 + 4762e6 + 84e6,  # CLIP-L, T5-XXL, VAE (FLUX.1's)
    published={"black-forest-labs/FLUX.1-Kontext-dev": flux.FLUX_DEV},
)

__all__ = ["FLUX_KONTEXT", "FamilyDescription"]
