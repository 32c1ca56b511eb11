"""On CUDA: a 4-bit UNet quantized layer by layer on the GPU computes what the CPU-quantized one does."""

import copy

import pytest
import torch

from personalize import adapters
from personalize.models import build_tiny

pytestmark = pytest.mark.gpu


def test_unet_quantized_on_cuda_matches_cpu_and_trains_an_adapter():
    pytest.importorskip("bitsandbytes")
    unet = build_tiny("tiny-sd15").unet.requires_grad_(False)
    on_cpu, on_gpu = copy.deepcopy(unet), copy.deepcopy(unet)
    adapters.quantize_unet(on_cpu, "nf4")
    adapters.quantize_unet(on_gpu, "nf4", device="cuda")
    assert type(on_gpu.down_blocks[0].resnets[0].conv1).__name__ == "Conv2d4bit"
    on_gpu.to("cuda")
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 16, 16, generator=generator)
    context = torch.randn(1, 8, unet.config.cross_attention_dim, generator=generator)
    with torch.no_grad():
        expected = on_cpu(sample, 10, encoder_hidden_states=context).sample
        got = on_gpu(sample.cuda(), 10, encoder_hidden_states=context.cuda()).sample
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-3, atol=1e-3)
    adapters.inject(on_gpu, "lora", targets="attention", name="a", rank=4)
    on_gpu.to("cuda")
    out = on_gpu(sample.cuda().requires_grad_(True), 10, encoder_hidden_states=context.cuda()).sample
    out.square().mean().backward()
    assert all(p.grad is not None and p.grad.is_cuda for p in adapters.trainable_parameters(on_gpu))
