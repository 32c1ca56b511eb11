"""Step-memory choices: lean frozen convs give the same gradients with less saved, CPU kernel and trim switches."""

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from personalize import adapters
from personalize.trainers.common.step_memory import (
    LeanFrozenConv2d,
    _glibc,
    lean_frozen_convs,
    native_cpu_convolutions,
    step_memory_settings,
)
from personalize.trainers.diffusion.config import TrainConfig


def _convs() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.SiLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=2),
        nn.SiLU(),
        nn.Conv2d(8, 4, 1, bias=False),
    ).requires_grad_(False)


def _saved_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of non-parameter tensors autograd keeps for backward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(x).sum().backward()
    return sum(storages.values())


def test_lean_frozen_convs_give_the_same_input_gradient_and_save_less():
    model = _convs()
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    out = model(x)
    out.square().sum().backward()
    plain_out, plain_grad, plain_saved = out.detach(), x.grad.clone(), _saved_bytes(model, x.detach().requires_grad_())
    x.grad = None
    with lean_frozen_convs(model) as count:
        assert count == 3 and all(type(m) is LeanFrozenConv2d for m in model if isinstance(m, nn.Conv2d))
        out = model(x)
        out.square().sum().backward()
        lean_saved = _saved_bytes(model, x.detach().requires_grad_())
    torch.testing.assert_close(out.detach(), plain_out)
    torch.testing.assert_close(x.grad, plain_grad, rtol=1e-5, atol=1e-6)
    assert lean_saved < plain_saved
    assert all(type(m) is nn.Conv2d for m in model if isinstance(m, nn.Conv2d))  # restored on exit


def test_lean_convs_leave_trainable_convs_alone_and_restore_after_an_error():
    model = _convs()
    model[0].requires_grad_(True)
    x = torch.randn(1, 3, 8, 8, requires_grad=True)
    keys = list(model.state_dict())
    with pytest.raises(RuntimeError, match="boom"), lean_frozen_convs(model):
        model(x).sum().backward()
        assert model[0].weight.grad is not None and model[2].weight.grad is None
        raise RuntimeError("boom")
    assert all(type(m) is nn.Conv2d for m in model if isinstance(m, nn.Conv2d))
    assert list(model.state_dict()) == keys


def test_locon_adapter_on_a_lean_base_conv_gets_the_same_gradients():
    grads = []
    for lean in (False, True):
        model = _convs()
        adapters.inject(model, "lora", targets=["0", "4"], name="a", rank=2, alpha=2)
        for param in adapters.trainable_parameters(model):
            torch.manual_seed(1)
            nn.init.normal_(param)
        x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
        with lean_frozen_convs(model) if lean else torch.enable_grad():
            model(x).square().sum().backward()
        grads.append([param.grad.clone() for param in adapters.trainable_parameters(model)])
    for plain, lean in zip(*grads, strict=True):
        torch.testing.assert_close(lean, plain, rtol=1e-5, atol=1e-6)


def test_native_cpu_convolutions_switch_onednn_off_inside_only():
    before = torch.backends.mkldnn.enabled
    with native_cpu_convolutions(True):
        assert not torch.backends.mkldnn.enabled
    assert torch.backends.mkldnn.enabled == before
    with native_cpu_convolutions(False):
        assert torch.backends.mkldnn.enabled == before


def test_step_memory_settings_follow_device_and_dtype():
    unet = nn.Conv2d(1, 1, 1)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    auto = step_memory_settings(TrainConfig(), cpu, torch.float32, frozen=[unet])
    assert auto == {"lean_models": [unet], "native_cpu_conv": True, "lean_cpu_allocator": _glibc() is not None}
    assert not step_memory_settings(TrainConfig(), cpu, torch.bfloat16, [unet])["native_cpu_conv"]
    on_gpu = step_memory_settings(TrainConfig(), cuda, torch.float32, [unet])
    assert not on_gpu["native_cpu_conv"] and not on_gpu["lean_cpu_allocator"]
    chosen = TrainConfig(lean_convs=False, cpu_conv="onednn", cpu_allocator="default")
    assert step_memory_settings(chosen, cpu, torch.float32, [unet]) == {
        "lean_models": [],
        "native_cpu_conv": False,
        "lean_cpu_allocator": False,
    }


MAPPED_BLOCKS = r"""
import ctypes, torch
from personalize.trainers.common.step_memory import _glibc, lean_forward_allocations

class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

libc = _glibc()
libc.mallinfo2.restype = Mallinfo2
size = 8 * 1024 * 1024 // 4  # 8 MiB of float32: below the 32 MiB heap threshold, above the forward one's
counts = []
for lean in (True, False):
    with lean_forward_allocations(lean):
        before = libc.mallinfo2().hblks
        kept = torch.empty(size)
        counts.append(libc.mallinfo2().hblks - before)
    del kept
print(counts)
"""


@pytest.mark.skipif(_glibc() is None, reason="the allocator policy is glibc's")
def test_lean_forward_allocations_map_large_blocks_inside_the_block_only():
    # A fresh process: in a long one the heap may hold a free chunk that fits, which glibc reuses first.
    done = subprocess.run([sys.executable, "-c", MAPPED_BLOCKS], capture_output=True, text=True, check=True)
    assert done.stdout.split("\n")[-2] == "[1, 0]"


MAPPED_THROUGHOUT = MAPPED_BLOCKS.replace(
    """    with lean_forward_allocations(lean):
        before""",
    """    with lean_allocations_throughout(lean):
        with lean_forward_allocations(lean):  # a forward pass inside the training loop, then its backward
            pass
        before""",
).replace("import _glibc,", "import _glibc, lean_allocations_throughout,")


@pytest.mark.skipif(_glibc() is None, reason="the allocator policy is glibc's")
def test_lean_allocations_throughout_outlast_a_forward_block_inside_them():
    # a forward block inside the loop's block goes back to the loop's threshold, not to glibc's 32 MiB
    done = subprocess.run([sys.executable, "-c", MAPPED_THROUGHOUT], capture_output=True, text=True, check=True)
    assert done.stdout.split("\n")[-2] == "[1, 0]"


def test_a_run_with_every_step_memory_choice_off_trains_the_same_adapter(quick, tmp_path):
    # lr as before tiny models got their own defaults: the two kernels' rounding stays within the tolerance
    lean = quick(method="locon", lr=1e-4, output=str(tmp_path / "lean"), validation_images=0, cpu_allocator="lean")
    plain = quick(
        method="locon",
        lr=1e-4,
        output=str(tmp_path / "plain"),
        validation_images=0,
        lean_convs=False,
        cpu_conv="onednn",
        cpu_allocator="default",
    )
    ours, reference = (load_file(result.output_dir / "pytorch_lora_weights.safetensors") for result in (lean, plain))
    assert ours.keys() == reference.keys() and any("conv" in key for key in ours)
    for key in ours:
        torch.testing.assert_close(ours[key], reference[key], rtol=1e-4, atol=1e-5)


@pytest.mark.gpu
def test_lean_frozen_convs_on_cuda_give_the_same_gradients_under_autocast():
    from personalize.models import build_tiny

    unet = build_tiny("tiny-sd15").unet.requires_grad_(False).to("cuda")
    adapters.inject(unet, "lora", targets="attention", name="a", rank=2, alpha=2)
    sample = torch.randn(2, 4, 16, 16, device="cuda")
    context = torch.randn(2, 77, unet.config.cross_attention_dim, device="cuda")
    grads = []
    for lean in (False, True):
        unet.zero_grad(set_to_none=True)
        with lean_frozen_convs(unet) if lean else torch.enable_grad(), torch.autocast("cuda", torch.bfloat16):
            unet(sample, 10, context).sample.float().square().mean().backward()
        grads.append([param.grad.float().clone() for param in adapters.trainable_parameters(unet)])
    for plain, lean in zip(*grads, strict=True):
        torch.testing.assert_close(lean, plain, rtol=2e-2, atol=1e-4)
