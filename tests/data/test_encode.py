"""encode_text equals the stock pipelines' encode_prompt; encode_images scales the posterior mean."""

import pytest
import torch

from personalize.models.encode import encode_images, encode_text

PROMPTS = ["a photo of sks cat", "a photo of cat on a red sofa"]


@torch.no_grad()
def test_sd15_text_matches_pipeline(tiny_pipelines):
    pipe = tiny_pipelines("tiny-sd15")
    ours = encode_text(pipe, PROMPTS)
    stock, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, do_classifier_free_guidance=False)
    assert set(ours) == {"prompt_embeds"}
    assert ours["prompt_embeds"].shape == (2, 77, pipe.text_encoder.config.hidden_size)
    torch.testing.assert_close(ours["prompt_embeds"], stock, rtol=0, atol=0)


@torch.no_grad()
def test_sdxl_text_matches_pipeline(tiny_pipelines):
    pipe = tiny_pipelines("tiny-sdxl")
    ours = encode_text(pipe, PROMPTS)
    embeds, _, pooled, _ = pipe.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
    widths = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert ours["prompt_embeds"].shape == (2, 77, widths)
    torch.testing.assert_close(ours["prompt_embeds"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(ours["pooled_prompt_embeds"], pooled, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["tiny-sd3", "tiny-flux"])
@torch.no_grad()
def test_dit_text_has_embeds_and_pooled(tiny_pipelines, name):
    out = encode_text(tiny_pipelines(name), PROMPTS)
    assert out["prompt_embeds"].shape[0] == 2 and out["pooled_prompt_embeds"].shape[0] == 2


@torch.no_grad()
def test_images_are_scaled_posterior_mean(tiny_pipelines):
    vae = tiny_pipelines("tiny-sd15").vae
    pixels = torch.rand(2, 3, 32, 48) * 2 - 1
    latents = encode_images(vae, pixels)
    expected = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
    assert latents.shape == (
        2,
        4,
        32 // 2 ** (len(vae.config.block_out_channels) - 1),
        48 // 2 ** (len(vae.config.block_out_channels) - 1),
    )
    torch.testing.assert_close(latents, expected)


@torch.no_grad()
def test_images_shift_when_the_vae_has_one(tiny_pipelines):
    vae = tiny_pipelines("tiny-flux").vae
    pixels = torch.rand(1, 3, 32, 32) * 2 - 1
    mean = vae.encode(pixels).latent_dist.mean
    expected = (mean - vae.config.shift_factor) * vae.config.scaling_factor
    torch.testing.assert_close(encode_images(vae, pixels), expected)
