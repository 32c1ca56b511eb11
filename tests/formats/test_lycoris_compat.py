"""LyCORIS's own loader rebuilds our LoKr/KronA files at SD1.5 and SDXL attention shapes.

Our `lokr` files (LyCORIS's factorization) load as written; KronA with DiffuseKronA's a1=64, a2=8 does
not (LyCORIS infers another factor), and `personalize convert --to lycoris` rewrites it exactly.
ComfyUI-style readers multiply the stored factors: both files give the same delta that way.
"""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from personalize import adapters
from personalize.cli import main
from personalize.formats import save_adapter

lycoris = pytest.importorskip("lycoris")

# (out, in) of the attention projections: q/out (d, d), cross-attention k/v (d, context).
SD15 = {"d320": (320, 768), "d640": (640, 768), "d1280": (1280, 768)}
SDXL = {"d640": (640, 2048), "d1280": (1280, 2048)}
# Every factor choice our presets and method defaults use (configs/sd15-lokr, sdxl-lokr, sd15-krona).
PRESET_FACTORS = {
    "lokr": ("lokr", {"rank": 8, "alpha": 8, "factor": -1}),
    "krona": ("krona", {"a1": 64, "a2": 8}),
}


class Attention(nn.Module):
    def __init__(self, width: int, context: int) -> None:
        super().__init__()
        self.to_q, self.to_k = nn.Linear(width, width, bias=False), nn.Linear(context, width, bias=False)
        self.to_v, self.to_out = nn.Linear(context, width, bias=False), nn.ModuleList([nn.Linear(width, width)])


class Shapes(nn.Module):
    """Attention layers at real widths under UNet-like paths (kohya names them lora_unet_<path>)."""

    def __init__(self, shapes: dict[str, tuple[int, int]]) -> None:
        super().__init__()
        self.down_blocks = nn.ModuleDict({name: Attention(*dims) for name, dims in shapes.items()})

    def forward(self, x: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        outs = []
        for name, block in self.down_blocks.items():
            hidden, context = x[name]
            outs += [block.to_q(hidden), block.to_k(context), block.to_v(context), block.to_out[0](hidden)]
        return outs


def _trained(shapes: dict[str, tuple[int, int]], method: str, hyper: dict) -> Shapes:
    torch.manual_seed(0)
    model = Shapes(shapes)
    adapters.inject(model, method, targets=r".*\.(to_q|to_k|to_v|to_out\.0)", **hyper)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lokr" in name:
                param.copy_(torch.randn_like(param) * 0.05)
    return model


def _inputs(shapes: dict[str, tuple[int, int]]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return {
        n: (torch.randn(2, d, generator=generator), torch.randn(2, c, generator=generator))
        for n, (d, c) in shapes.items()
    }


def _lycoris_outputs(file, shapes: dict[str, tuple[int, int]], model: Shapes, inputs) -> list[torch.Tensor]:
    """Rebuild the adapter with LyCORIS's loader on a fresh copy of the base, as LyCORIS users do."""
    from lycoris.wrapper import LycorisNetwork, create_lycoris_from_weights

    logging.getLogger("lycoris").setLevel(logging.ERROR)
    base = Shapes(shapes)
    base.load_state_dict(
        {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if ".adapters." not in k}
    )
    previous = LycorisNetwork.LORA_PREFIX
    LycorisNetwork.LORA_PREFIX = "lora_unet"
    try:
        network, weights = create_lycoris_from_weights(1.0, str(file), base)
    finally:
        LycorisNetwork.LORA_PREFIX = previous
    assert len(network.loras) == 4 * len(shapes)
    network.apply_to()
    network.load_state_dict(weights, strict=False)
    with torch.no_grad():
        return base(inputs)


def _stored_product_delta(tensors: dict[str, torch.Tensor], module: str) -> torch.Tensor:
    """What ComfyUI computes: s * kron(w1, w2) with the factors as stored."""
    w1 = tensors[f"{module}.lokr_w1"]
    if f"{module}.lokr_w2" in tensors:
        w2, scale = tensors[f"{module}.lokr_w2"], 1.0
    else:
        w2 = tensors[f"{module}.lokr_w2_a"] @ tensors[f"{module}.lokr_w2_b"]
        scale = float(tensors[f"{module}.alpha"]) / tensors[f"{module}.lokr_w2_a"].shape[1]
    return torch.kron(w1, w2) * scale


@pytest.mark.parametrize("shapes", [SD15, pytest.param(SDXL, marks=pytest.mark.slow)], ids=["sd15", "sdxl"])
@pytest.mark.parametrize("choice", sorted(PRESET_FACTORS))
def test_lycoris_rebuilds_every_preset_factorization(tmp_path, shapes, choice):
    method, hyper = PRESET_FACTORS[choice]
    model = _trained(shapes, method, hyper)
    inputs = _inputs(shapes)
    with torch.no_grad():
        ours = model(inputs)
    components = {"unet": adapters.state_dict(model)}
    save_adapter(tmp_path, components, method=method, family="sd1", hyper=hyper, output_name="written")
    written = tmp_path / "written.safetensors"
    if choice == "krona":  # as written, LyCORIS infers factor 40 and a (8, 8) w1: the defect this fixes
        with pytest.raises(RuntimeError, match="size"):
            _lycoris_outputs(written, shapes, model, inputs)
    else:
        for got, want in zip(_lycoris_outputs(written, shapes, model, inputs), ours):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)

    converted = tmp_path / "for-lycoris.safetensors"
    assert main(["convert", str(written), str(converted), "--to", "lycoris"]) == 0
    for got, want in zip(_lycoris_outputs(converted, shapes, model, inputs), ours):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # ComfyUI-style readers (stored factors multiplied) see the same delta in both files.
    before, after = load_file(written), load_file(converted)
    for module in {key.split(".")[0] for key in before}:
        torch.testing.assert_close(
            _stored_product_delta(after, module), _stored_product_delta(before, module), rtol=1e-4, atol=1e-6
        )
