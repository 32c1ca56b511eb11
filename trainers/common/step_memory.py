"""What one training step keeps in memory on a frozen base, and which CPU kernels it runs.

Three measured choices (benchmarks/train_step.py: SD1.5 architecture, 256 px, batch 1, LoRA on
attention, fp32, 2-core CPU; the figures are in the closing note of the trainer issue):

- Frozen convolutions keep no input for backward (`lean_frozen_convs`). Autograd's convolution
  saves its input even when the weight needs no gradient, but the input gradient of y = conv(x, W)
  is conv_transpose(dy, W): it needs W and the *shape* of x only. In a UNet the input of a ResNet
  conv is the SiLU output, which nothing else saves, so this drops ~15% of the activations kept
  for backward (57 of 386 MB in the benchmark; the same share on a GPU).
- fp32 convolutions on a CPU use PyTorch's native im2col + GEMM kernels instead of oneDNN
  (`native_cpu_convolutions`): oneDNN re-lays out every weight into its blocked format on each call,
  a 56-112 MB scratch copy per 1280-channel 3x3 conv, forward and backward -- at 256 px that costs
  more time than the blocked kernel saves (17-25% less step time, 170 MB less peak). Not for bf16/fp16, whose
  native CPU path is many times slower, and not on accelerators.
- On a CPU with glibc, the forward pass allocates its large tensors outside the shared heap and the
  heap's free pages go back to the OS after it (`lean_forward_allocations`). glibc keeps freed heap
  memory for reuse, so a CPU run's resident memory is the high-water mark of live tensors *plus*
  what fragmentation strands -- 550 MB beside 400 MB of live activations in the benchmark;
  this cut the peak by ~200 MB with no step-time change beyond the machine's noise.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
from collections.abc import Iterator
from functools import cache
from typing import Any

import torch
from torch import nn

from personalize.adapters.frozen_conv import frozen_conv2d, plain_conv


class LeanFrozenConv2d(nn.Conv2d):
    """An nn.Conv2d whose backward keeps no input while its weight and bias are frozen."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        trains = self.weight.requires_grad or (self.bias is not None and self.bias.requires_grad)
        if trains or not (torch.is_grad_enabled() and x.requires_grad):
            return super().forward(x)
        return frozen_conv2d(x, self)

    def frozen_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return self.weight.to(dtype)  # a copy only under autocast


@contextlib.contextmanager
def lean_frozen_convs(*models: nn.Module) -> Iterator[int]:
    """Within the block, the plain Conv2d layers of `models` are LeanFrozenConv2d; yields their count.

    Only the class of each instance changes (same parameters, state_dict keys and outputs), and it
    is changed back on exit, so a caller's model is left as it was. A conv whose weight trains
    (full fine-tune, a ControlNet) takes the ordinary path.
    """
    convs = [module for model in models for module in model.modules() if plain_conv(module)]
    for conv in convs:
        conv.__class__ = LeanFrozenConv2d
    try:
        yield len(convs)
    finally:
        for conv in convs:
            conv.__class__ = nn.Conv2d


def step_memory_settings(
    config: Any, device: torch.device, compute_dtype: torch.dtype, frozen: list[nn.Module]
) -> dict[str, Any]:
    """LoopSettings keys from the config's lean_convs / cpu_conv / cpu_allocator (auto: by device, dtype)."""
    on_cpu = device.type == "cpu"
    native = config.cpu_conv == "native" or (config.cpu_conv == "auto" and on_cpu and compute_dtype == torch.float32)
    lean = config.cpu_allocator == "lean" or (config.cpu_allocator == "auto" and on_cpu and _glibc() is not None)
    return {"lean_models": frozen if config.lean_convs else [], "native_cpu_conv": native, "lean_cpu_allocator": lean}


@contextlib.contextmanager
def native_cpu_convolutions(enabled: bool) -> Iterator[None]:
    """Within the block, CPU convolutions run on PyTorch's native kernels instead of oneDNN (when enabled)."""
    if not enabled:
        yield
        return
    before = torch.backends.mkldnn.enabled
    torch.backends.mkldnn.enabled = False  # the switch alone: mkldnn.flags() also resets TF32 and warns
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = before


M_MMAP_THRESHOLD = -3  # mallopt parameter number in glibc's malloc.h
FORWARD_MMAP_THRESHOLD = 256 * 2**10  # forward-pass blocks from this size get their own pages
HEAP_MMAP_THRESHOLD = 32 * 2**20  # glibc's own ceiling, where its sliding threshold settles in training


@cache
def _glibc() -> Any:
    """The C library when it is glibc (mallopt and malloc_trim behave as documented there), else None."""
    import platform

    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c"))
    except OSError:
        return None


_outer_threshold = HEAP_MMAP_THRESHOLD  # what lean_forward_allocations goes back to on exit


@contextlib.contextmanager
def lean_allocations_throughout(enabled: bool) -> Iterator[None]:
    """Within the block (a training loop), backward and the optimizer map blocks of 256 KiB and more on their
    own too, not the forward pass alone.

    For a model whose frozen layers make a large temporary per layer in backward (a 4-bit weight dequantized
    again, the fp32 copy of frozen_linear's input gradient, a checkpointed block's recomputed forward), those
    temporaries of 1-16 MB otherwise settle in the heap between the tensors that stay, and the heap grows step
    by step: a 0.5B Llama QLoRA run on a CPU peaked at 0.78-1.54 GiB above imports (grown over its first
    3 steps, varying run to run), 0.50 GiB with this; bf16 LoRA 1.20 -> 1.09 GiB, at the same step time.
    """
    global _outer_threshold
    libc = _glibc() if enabled else None
    if libc is None:
        yield
        return
    libc.mallopt(M_MMAP_THRESHOLD, FORWARD_MMAP_THRESHOLD)
    _outer_threshold = FORWARD_MMAP_THRESHOLD
    try:
        yield
    finally:
        _outer_threshold = HEAP_MMAP_THRESHOLD
        libc.mallopt(M_MMAP_THRESHOLD, HEAP_MMAP_THRESHOLD)
        libc.malloc_trim(0)


@contextlib.contextmanager
def lean_forward_allocations(enabled: bool) -> Iterator[None]:
    """Within the block (a forward pass), blocks of 256 KiB and more are mapped on their own; on exit the
    threshold goes back to 32 MiB and the heap's free pages are returned to the OS (malloc_trim).

    The forward pass interleaves tensors kept for backward with temporaries freed a moment later, so
    in the shared heap the temporaries leave holes that backward and the next forward cannot always
    fill; mapped blocks go back to the OS the moment they are freed. Backward and the optimizer keep the
    heap, whose reused pages cost no page faults. The 32 MiB left in place after the block is where
    glibc's own sliding threshold ends up in a training process anyway.
    """
    libc = _glibc() if enabled else None
    if libc is None:
        yield
        return
    libc.mallopt(M_MMAP_THRESHOLD, FORWARD_MMAP_THRESHOLD)
    try:
        yield
    finally:
        libc.mallopt(M_MMAP_THRESHOLD, _outer_threshold)
        libc.malloc_trim(0)


def return_freed_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc; elsewhere nothing), e.g. after loading a model
    weight by weight, whose freed read buffers would otherwise stay resident for the whole run."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
