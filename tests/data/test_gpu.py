"""On CUDA: the cache runs the encoders where they are (fp16 here) and stores CPU tensors; pinned batches."""

import copy

import pytest
import torch

from personalize.data import DataConfig, build_dataset, build_loader, cache_dataset
from personalize.models.encode import encode_text

pytestmark = pytest.mark.gpu


def test_cache_on_cuda_fp16_matches_cpu(good_folder, tmp_path, tiny_pipelines):
    cpu = tiny_pipelines("tiny-sd15")
    gpu = copy.deepcopy(cpu).to("cuda", torch.float16)
    dataset = build_dataset(DataConfig(images=str(good_folder), resolution=64, bucket_step=16, flip=0.5))
    on_gpu = cache_dataset(dataset, gpu, cache_dir=tmp_path / "gpu")
    on_cpu = cache_dataset(dataset, cpu, cache_dir=tmp_path / "cpu")
    assert on_gpu.stats.latents_encoded == on_cpu.stats.latents_encoded == 6
    for index in range(len(dataset)):
        half, full = on_gpu[(1, index)], on_cpu[(1, index)]
        assert half["latents"].device.type == "cpu" and half["latents"].dtype == torch.float16
        torch.testing.assert_close(half["latents"].float(), full["latents"], rtol=2e-2, atol=2e-2)
        torch.testing.assert_close(half["prompt_embeds"].float(), full["prompt_embeds"], rtol=2e-2, atol=2e-2)
    batch = next(iter(build_loader(on_gpu, batch_size=2, num_workers=1)))
    assert batch["latents"].is_pinned()


@torch.no_grad()
def test_sdxl_text_on_cuda_matches_pipeline(tiny_pipelines):
    pipe = copy.deepcopy(tiny_pipelines("tiny-sdxl")).to("cuda", torch.float16)
    prompts = ["a photo of sks dog", "a dog"]
    ours = encode_text(pipe, prompts)
    embeds, _, pooled, _ = pipe.encode_prompt(prompts, device="cuda", do_classifier_free_guidance=False)
    assert ours["prompt_embeds"].device.type == "cuda"
    torch.testing.assert_close(ours["prompt_embeds"], embeds, rtol=0, atol=0)
    torch.testing.assert_close(ours["pooled_prompt_embeds"], pooled, rtol=0, atol=0)
