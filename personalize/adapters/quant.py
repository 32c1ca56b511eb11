"""4-bit / 8-bit bases (bitsandbytes): quantize a model in place, read and write quantized weights.

`quantize(model, "nf4" | "fp4" | "int8")` swaps every `nn.Linear` (except `skip`) for a bitsandbytes
`Linear4bit` / `Linear8bitLt` holding the same weights, and with `convs=True` every plain Conv2d for a
4-bit `Conv2d4bit` (quant_conv.py; UNets are mostly convolutions). `read_weight` lets the caller supply
each full-precision weight (personalize.models.mapped reads them from disk one at a time). The adapter
core reads a quantized weight with `dequantized_weight` (merge, DoRA norms, SVD export) and writes one
back with `write_weight`, which re-quantizes and therefore rounds.
"""

from __future__ import annotations

import logging
import re
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import nn

from personalize.errors import UserError

QUANT_MODES = ("nf4", "fp4", "int8")


def _bnb():
    # bitsandbytes logs a warning about optional GPU kernels at import; it means nothing on CPU.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        import bitsandbytes
    except ImportError:
        raise UserError("4-bit/8-bit bases need bitsandbytes: pip install 'personalize[quant]'") from None
    return bitsandbytes


def quant_mode(layer: nn.Module) -> str | None:
    """'4bit' for bnb Linear4bit, 'int8' for Linear8bitLt, None for a plain layer (no bnb import)."""
    name = type(layer).__name__
    if name in ("Linear4bit", "LinearNF4", "LinearFP4", "Conv2d4bit"):
        return "4bit"
    if name == "Linear8bitLt":
        return "int8"
    return None


def _unpack_cpu_format(weight: nn.Parameter) -> None:
    # On CPU, bnb repacks 4-bit weights for its inference kernel after the first eval forward;
    # dequantize_4bit reads only the standard layout.
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    if getattr(weight.quant_state, "packing_format_for_cpu", False):
        weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, weight.quant_state)


def _int8_scales(layer: nn.Module) -> torch.Tensor:
    scb = getattr(layer.weight, "SCB", None)
    if scb is None:  # moved to the layer state by the first forward
        scb = layer.state.SCB
    return scb


def dequantized_weight(layer: nn.Module) -> torch.Tensor:
    """The layer's weight as a float tensor (out, in[, kh, kw]), whatever its storage."""
    mode = quant_mode(layer)
    if mode is None:
        return layer.weight
    bnb = _bnb()
    if mode == "4bit":
        _unpack_cpu_format(layer.weight)
        flat = bnb.functional.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
        return flat.view(getattr(layer, "weight_shape", flat.shape))  # a 4-bit conv stores (out, in * kh * kw)
    # int8 row-wise: W = CB * SCB / 127
    return layer.weight.data.float() * _int8_scales(layer).float().unsqueeze(1) / 127.0


def write_weight(layer: nn.Module, weight: torch.Tensor) -> None:
    """Set the layer's weight to `weight` (re-quantized for a bnb layer, so the result rounds)."""
    mode = quant_mode(layer)
    if mode is None:
        # Swap the new tensor in rather than copying into the old one: a pass less, and whoever kept the
        # old tensor (personalize.pipelines' exact unfuse) still holds the untouched original.
        layer.weight.data = weight.detach().to(layer.weight.dtype)
        return
    bnb = _bnb()
    device = layer.weight.device
    if mode == "4bit":
        _unpack_cpu_format(layer.weight)
        old = layer.weight
        new = bnb.nn.Params4bit(
            weight.detach().to("cpu", old.quant_state.dtype).flatten(1),  # dequantizes to the same dtype
            requires_grad=False,
            quant_type=old.quant_type,
            blocksize=old.blocksize,
            compress_statistics=old.compress_statistics,
            quant_storage=old.quant_storage,
            module=layer,
        )
        layer.weight = new.to(device)
        return
    new = bnb.nn.Int8Params(weight.detach().to("cpu", torch.float32), requires_grad=False, has_fp16_weights=False)
    layer.weight = new.to(device)
    layer.state.CB = None
    layer.state.SCB = None


def warn_requantize(path: str) -> None:
    warnings.warn(
        f"{path}: merging into a quantized weight re-quantizes it, so the merged layer differs slightly from "
        "base + adapter; keep the adapter unmerged for exact outputs",
        stacklevel=3,
    )


@dataclass
class QuantizeReport:
    layers: int
    bytes_before: int
    bytes_after: int

    def summary(self) -> str:
        mib = 1024 * 1024
        return (
            f"quantized {self.layers} layers: {self.bytes_before / mib:.1f} MiB -> "
            f"{self.bytes_after / mib:.1f} MiB of parameters"
        )


def _parameter_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters()) + sum(
        b.numel() * b.element_size() for b in model.buffers()
    )


def _quantized_linear(
    linear: nn.Linear, mode: str, compute_dtype: torch.dtype, weight: torch.Tensor, device: torch.device
) -> nn.Module:
    bnb = _bnb()
    weight = weight.detach().to("cpu", _storage_dtype(compute_dtype))
    has_bias = linear.bias is not None
    if mode == "int8":
        layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False)
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        layer = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=has_bias, compute_dtype=compute_dtype, quant_type=mode
        )
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type=mode, module=layer)
    if has_bias:
        layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
    return layer.to(device)


def _quantized_conv(
    conv: nn.Conv2d, mode: str, weight: torch.Tensor, device: torch.device, compute_dtype: torch.dtype
) -> nn.Module:
    from personalize.adapters.quant_conv import Conv2d4bit

    return Conv2d4bit(conv, mode, weight.to(_storage_dtype(compute_dtype)), device).to(device)


def _storage_dtype(compute_dtype: torch.dtype) -> torch.dtype:
    """A 4-bit weight dequantizes to the dtype it was quantized from: quantizing from the half-precision
    compute dtype saves a cast of every dequantized weight, in every forward and backward."""
    return compute_dtype if compute_dtype in (torch.float16, torch.bfloat16) else torch.float32


def quantize(
    model: nn.Module,
    mode: str = "nf4",
    skip: Iterable[str] = ("lm_head",),
    compute_dtype: torch.dtype = torch.float32,
    convs: bool = False,
    read_weight: Callable[[str], torch.Tensor | None] | None = None,
    device: torch.device | str | None = None,
) -> QuantizeReport:
    """Replace every nn.Linear (and with `convs`, plain Conv2d) of `model` except `skip` paths, in place.

    `skip`: regexes or dotted suffixes. `read_weight(path + ".weight")` supplies the full-precision
    weight when given (None, or no reader: the layer's own). `device`: where the quantized layers go (and where
    bitsandbytes quantizes: a GPU does it in a fraction of the CPU's time); default: each layer's own.
    """
    from personalize.adapters.frozen_conv import plain_conv

    if mode not in QUANT_MODES:
        raise UserError(f"unknown quantization '{mode}'; choose one of {', '.join(QUANT_MODES)}")
    if convs and mode == "int8":
        raise UserError("int8 quantizes Linear layers only; use nf4 or fp4 to quantize convolutions too")
    _bnb()
    skip_patterns = [re.compile(f"(.*\\.)?{s}" if re.fullmatch(r"[\w.]+", s) else s) for s in skip]
    before = _parameter_bytes(model)
    targets = [
        (path, module)
        for path, module in model.named_modules()
        if (type(module) is nn.Linear or (convs and plain_conv(module)))
        and not any(p.fullmatch(path) for p in skip_patterns)
    ]
    for path, module in targets:
        weight = read_weight(f"{path}.weight") if read_weight is not None else None
        weight = module.weight if weight is None else weight
        target = torch.device(device) if device is not None else module.weight.device
        if isinstance(module, nn.Linear):
            layer = _quantized_linear(module, mode, compute_dtype, weight, target)
        else:
            layer = _quantized_conv(module, mode, weight, target, compute_dtype)
        parent_path, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent_path) if parent_path else model, child, layer)
    return QuantizeReport(len(targets), before, _parameter_bytes(model))


UNET_FULL_PRECISION = ("conv_in", "conv_out")  # the smallest layers, and the most sensitive to rounding


def quantize_unet(
    unet: nn.Module,
    mode: str = "nf4",
    compute_dtype: torch.dtype = torch.float32,
    read_weight: Callable[[str], torch.Tensor | None] | None = None,
    device: torch.device | str | None = None,
) -> QuantizeReport:
    """A frozen UNet in 4 bits: its Linear layers and (nf4/fp4) its convolutions -- 70% of an SD1.x
    UNet's weights -- except conv_in/conv_out; int8 quantizes the Linear layers only."""
    convs = mode != "int8"
    return quantize(unet, mode, UNET_FULL_PRECISION, compute_dtype, convs, read_weight, device)
