"""Flow-matching math and the family descriptions' packing, against diffusers' own functions."""

import pytest
import torch

from personalize.models.families import FLOW_FAMILIES, described_family, family_of_config, published_config
from personalize.models.families import flux as flux_family
from personalize.trainers.diffusion import flow_step


def test_flux_packing_and_position_ids_match_the_pipeline():
    from diffusers import FluxPipeline

    latents = torch.randn(2, 16, 8, 12)  # (B, C, h, w)
    packed = flux_family.pack(latents)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, 16, 8, 12))
    assert torch.equal(flux_family.unpack(packed, 8, 12), latents)
    reference = FluxPipeline._prepare_latent_image_ids(2, 4, 6, "cpu", torch.float32)
    assert torch.equal(flux_family.image_ids(8, 12, "cpu", torch.float32), reference)


@pytest.mark.parametrize("scheme", flow_step.WEIGHTING_SCHEMES)
def test_density_and_weighting_match_diffusers_training_utils(scheme):
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    ours = flow_step.timestep_density(scheme, 64, torch.Generator().manual_seed(3), 0.2, 1.1, 1.29)
    theirs = compute_density_for_timestep_sampling(
        scheme, 64, logit_mean=0.2, logit_std=1.1, mode_scale=1.29, generator=torch.Generator().manual_seed(3)
    )
    torch.testing.assert_close(ours, theirs)
    sigmas = torch.rand(64) * 0.98 + 0.01
    torch.testing.assert_close(flow_step.loss_weighting(scheme, sigmas), compute_loss_weighting_for_sd3(scheme, sigmas))


def test_sigmas_come_from_the_schedulers_shift():
    from diffusers import FlowMatchEulerDiscreteScheduler

    shifted = flow_step.flow_schedule(FlowMatchEulerDiscreteScheduler(shift=3.0).config)
    plain = flow_step.flow_schedule(FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True).config)
    u = torch.tensor([0.0, 0.5, 0.999])
    t, s = flow_step.sample_sigmas(shifted, u)
    torch.testing.assert_close(s, t / 1000)
    s_plain = flow_step.sample_sigmas(plain, u)[1]
    torch.testing.assert_close(s, 3 * s_plain / (1 + 2 * s_plain))  # shift * s / (1 + (shift - 1) s)


def test_preconditioned_loss_is_sigma_squared_times_the_velocity_loss(tiny_pipelines):
    pipe = tiny_pipelines("tiny-sd3")
    family = FLOW_FAMILIES["sd3"]
    latents = torch.randn(3, 4, 8, 8)
    embeds = {"prompt_embeds": torch.randn(3, 10, 32), "pooled_prompt_embeds": torch.randn(3, 64)}
    schedule = flow_step.flow_schedule(pipe.scheduler.config)
    results = {}
    for precondition in (False, True):
        settings = flow_step.FlowSettings("logit_normal", precondition_outputs=precondition)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            loss, _ = flow_step.per_sample_loss(
                family, pipe.transformer, latents, embeds, schedule, settings, generator, torch.float32
            )
        results[precondition] = loss
    generator = torch.Generator().manual_seed(0)
    torch.randn(latents.shape, generator=generator)  # the noise, drawn first
    u = flow_step.timestep_density("logit_normal", 3, generator)
    sigmas = flow_step.sample_sigmas(schedule, u)[1]
    torch.testing.assert_close(results[True], sigmas**2 * results[False], rtol=1e-4, atol=1e-6)


def test_families_are_told_from_configs_and_published_ids_without_downloads(tiny_pipelines):
    assert family_of_config(dict(tiny_pipelines("tiny-flux").transformer.config)).name == "flux"
    assert family_of_config(dict(tiny_pipelines("tiny-sd3").transformer.config)).name == "sd3"
    assert family_of_config(dict(tiny_pipelines("tiny-sd15").unet.config)) is None
    assert described_family("tiny-flux").name == "flux" and described_family("tiny-sd15") is None
    assert published_config("black-forest-labs/FLUX.1-dev")[1]["num_single_layers"] == 38
    assert described_family("stabilityai/stable-diffusion-3.5-large").name == "sd3"
    for family in FLOW_FAMILIES.values():  # every published config builds the real architecture class
        for config in family.published.values():
            assert family.matches(config)


def test_flux_presets_name_the_reference_targets(tiny_pipelines):
    from personalize.adapters.targets import select

    transformer = tiny_pipelines("tiny-flux").transformer
    chosen = select(transformer, "attention+ff")
    assert "transformer_blocks.0.attn.add_q_proj" in chosen and "transformer_blocks.0.ff_context.net.2" in chosen
    assert "single_transformer_blocks.0.attn.to_q" in chosen  # 'attn.to_q' as the reference's suffix matches it
    assert "single_transformer_blocks.0.proj_mlp" not in chosen
    assert "single_transformer_blocks.0.proj_mlp" in select(transformer, "all-linear")
