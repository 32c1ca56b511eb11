"""The loss pieces agree with diffusers' schedulers and with their formulas."""

import pytest
import torch
from diffusers import DDPMScheduler

from personalize.trainers.diffusion import losses


@pytest.fixture
def scheduler():
    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def test_add_noise_and_velocity_match_diffusers(scheduler):
    generator = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 4, 8, 8, generator=generator)
    noise = torch.randn(3, 4, 8, 8, generator=generator)
    t = torch.tensor([0, 500, 999])
    abar = scheduler.alphas_cumprod
    torch.testing.assert_close(losses.add_noise(abar, x0, noise, t), scheduler.add_noise(x0, noise, t))
    torch.testing.assert_close(losses.velocity(abar, x0, noise, t), scheduler.get_velocity(x0, noise, t))
    assert losses.target_for("epsilon", abar, x0, noise, t) is noise
    with pytest.raises(ValueError):
        losses.target_for("nonsense", abar, x0, noise, t)


def test_min_snr_weights_follow_the_formula(scheduler):
    t = torch.tensor([10, 300, 900])
    values = losses.snr(scheduler.alphas_cumprod, t)
    abar = scheduler.alphas_cumprod[t]
    torch.testing.assert_close(values, abar / (1 - abar))
    eps = losses.min_snr_weights(values, 5.0, "epsilon")
    v = losses.min_snr_weights(values, 5.0, "v_prediction")
    torch.testing.assert_close(eps, torch.minimum(values, torch.tensor(5.0)) / values)
    torch.testing.assert_close(v, torch.minimum(values, torch.tensor(5.0)) / (values + 1))
    assert eps[0] < 1 and eps[-1] == 1  # low noise (high snr) is down-weighted; high noise keeps 1


def test_offset_noise_shifts_each_channel():
    latents = torch.zeros(2, 4, 16, 16)
    plain = losses.sample_noise(latents, 0.0, torch.Generator().manual_seed(1))
    offset = losses.sample_noise(latents, 0.5, torch.Generator().manual_seed(1))
    shift = offset - plain  # constant over H, W per (sample, channel)
    assert torch.allclose(shift, shift[:, :, :1, :1].expand_as(shift))
    assert shift.abs().sum() > 0


def test_prior_preservation_combines_instance_and_class_rows():
    per_sample = torch.tensor([1.0, 3.0, 10.0, 20.0])
    is_class = torch.tensor([False, False, True, True])
    loss, parts = losses.combine(per_sample, is_class=is_class, prior_weight=0.5)
    assert parts == {"instance": 2.0, "prior": 15.0}
    assert float(loss) == pytest.approx(2.0 + 0.5 * 15.0)
    loss, parts = losses.combine(per_sample, weights=torch.tensor([1.0, 0.0, 1.0, 1.0]))
    assert float(loss) == pytest.approx(31.0 / 4) and "prior" not in parts


def test_masked_mse_ignores_masked_pixels():
    prediction = torch.zeros(1, 4, 2, 2)
    target = torch.ones(1, 4, 2, 2)
    target[..., 0, 0] = 100.0
    mask = torch.ones(1, 1, 2, 2)
    mask[..., 0, 0] = 0.0
    assert float(losses.per_sample_mse(prediction, target, mask)[0]) == pytest.approx(1.0)


def test_flow_matching_interpolates_and_targets_the_velocity():
    x0, noise = torch.randn(2, 4, 4, 4), torch.randn(2, 4, 4, 4)
    sigmas = losses.logit_normal_sigmas(2, generator=torch.Generator().manual_seed(0))
    assert ((sigmas > 0) & (sigmas < 1)).all()
    x_t, target = losses.flow_match_inputs(x0, noise, torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(x_t[0], x0[0])
    torch.testing.assert_close(x_t[1], noise[1])
    torch.testing.assert_close(target, noise - x0)
