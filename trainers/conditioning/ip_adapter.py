"""IP-Adapter (Ye et al. 2023, arXiv 2308.06721): a reference image as a prompt, by decoupled cross-attention.

A frozen CLIP image encoder gives the reference's embedding e (B, D); a projection turns it into N = 4
tokens c_i = LayerNorm(reshape(W e + b)) (B, 4, d); every cross-attention layer gets its own keys and
values for them, and adds a second attention to the text one:

    Z = Attn(Q, K_t, V_t) + scale * Attn(Q, c_i W_k', c_i W_v')

Only the projection and W_k', W_v' (`to_k_ip`, `to_v_ip`, initialized from the text `to_k`, `to_v`)
train. The image embedding is zeroed with probability `conditioning.image_dropout` (and the prompt
emptied with `prompt_dropout`), which the paper uses to enable classifier-free guidance on both.
The modules are diffusers' own (`IPAdapterAttnProcessor2_0`, `ImageProjection`), created by the same
`_load_ip_adapter_weights` that `pipe.load_ip_adapter` runs, so the saved file round-trips exactly.
Output: `ip_adapter.safetensors` (`image_proj.*`, `ip_adapter.<id>.to_k_ip/to_v_ip.weight`) and the
image encoder folder `image_encoder/` beside it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from personalize.errors import UserError

WEIGHT_FILE = "ip_adapter.safetensors"
NUM_TOKENS = 4  # what diffusers' loader assumes for an `image_proj.proj.weight` file
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# the image encoders the public IP-Adapter weights use (repo/subfolder)
DEFAULT_ENCODERS = {
    "sd1": "h94/IP-Adapter/models/image_encoder",
    "sd2": "h94/IP-Adapter/models/image_encoder",
    "sdxl": "h94/IP-Adapter/sdxl_models/image_encoder",
}


def clip_pixels(images: torch.Tensor, size: int) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] -> CLIP input (B, 3, size, size): center square crop, bicubic resize, normalize."""
    height, width = images.shape[-2:]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    square = images[..., top : top + side, left : left + side]
    resized = F.interpolate(square.float(), size=(size, size), mode="bicubic", align_corners=False, antialias=True)
    mean = torch.tensor(CLIP_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=images.device).view(1, 3, 1, 1)
    return (resized.clamp(0, 1) - mean) / std


def load_image_encoder(name: str, model: str, family: str) -> Any:
    """The CLIPVisionModelWithProjection: `name` (folder or hub id[/subfolder]), else the family's."""
    from personalize.models import is_tiny

    if not name and is_tiny(model):
        from personalize.models.tiny_vision import tiny_clip_vision

        return tiny_clip_vision()
    name = name or DEFAULT_ENCODERS[family]
    from transformers import CLIPVisionModelWithProjection

    path = Path(name).expanduser()
    try:
        if path.is_dir():
            return CLIPVisionModelWithProjection.from_pretrained(str(path))
        parts = name.split("/")
        subfolder = "/".join(parts[2:]) or None
        kwargs: dict[str, Any] = {"subfolder": subfolder} if subfolder else {}
        return CLIPVisionModelWithProjection.from_pretrained("/".join(parts[:2]), **kwargs)
    except (OSError, ValueError) as error:
        raise UserError(
            f"cannot load the image encoder '{name}' ({str(error).splitlines()[0][:120]}); pass "
            "--image-encoder with a CLIPVisionModelWithProjection folder or hub id"
        ) from None


class IPAdapterParts(nn.Module):
    """What trains, as one module: the image projection and the IP processors (both live in the UNet).

    The frozen image encoder is kept unregistered (it neither trains nor is saved in checkpoints)."""

    def __init__(self, image_proj: nn.Module, processors: dict[str, nn.Module], encoder: Any) -> None:
        super().__init__()
        self.image_proj = image_proj
        self.processors = nn.ModuleList(processors.values())
        self.names = list(processors)
        self.__dict__["encoder"] = encoder

    def forward(self, unet: Any, *args: Any, **kwargs: Any) -> Any:
        """Run the UNet (which holds these modules) through this module, so that a DDP wrapper of it sees the
        forward and synchronizes the gradients, and accelerate's autocast applies."""
        return unet(*args, **kwargs)


def initial_state_dict(unet: Any, embed_dim: int, seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    """The layout `_load_ip_adapter_weights` reads: a random projection; K/V copies of the text K/V."""
    cross_dim = unet.config.cross_attention_dim
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        proj = nn.Linear(embed_dim, NUM_TOKENS * cross_dim)
    image_proj = {
        "proj.weight": proj.weight.detach(),
        "proj.bias": proj.bias.detach(),
        "norm.weight": torch.ones(cross_dim),
        "norm.bias": torch.zeros(cross_dim),
    }
    layers: dict[str, torch.Tensor] = {}
    key_id = 1  # diffusers numbers the cross-attention layers 1, 3, 5, ... in attn_processors order
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        attention = unet.get_submodule(name.removesuffix(".processor"))
        for ours, theirs in (("to_k_ip", attention.to_k), ("to_v_ip", attention.to_v)):
            base = getattr(theirs, "base_layer", theirs)  # a personalization adapter may wrap it
            layers[f"{key_id}.{ours}.weight"] = base.weight.detach().float().clone()
        key_id += 2
    return {"image_proj": image_proj, "ip_adapter": layers}


def pair(images: Any, conditioning: Any) -> Any:
    from personalize.data.paired import build_paired

    return build_paired(images, conditioning.reference, key="reference", what="reference")


def build(pipe: Any, family: str, config: Any) -> dict[str, nn.Module]:
    unet = pipe.unet
    if unet.config.encoder_hid_dim_type is not None:
        raise UserError("this UNet already has an image/text projection (IP-Adapter or Kolors); unload it first")
    device = next(unet.parameters()).device
    encoder = load_image_encoder(config.conditioning.image_encoder, config.model, family).to(device).eval()
    encoder.requires_grad_(False)
    originals = dict(unet.attn_processors)
    state = initial_state_dict(unet, encoder.config.projection_dim, seed=config.seed)
    unet._load_ip_adapter_weights([state], low_cpu_mem_usage=False)
    processors = {name: proc for name, proc in unet.attn_processors.items() if isinstance(proc, nn.Module)}
    parts = IPAdapterParts(unet.encoder_hid_proj, processors, encoder)
    parts.__dict__["originals"] = originals
    parts.requires_grad_(True)
    return {"ip_adapter": parts}


def predict(
    unet: Any,
    models: dict[str, Any],
    noisy: torch.Tensor,
    timesteps: torch.Tensor,
    kwargs: dict[str, Any],
    batch: dict[str, Any],
    config: Any,
    generator: torch.Generator,
) -> torch.Tensor:
    """The UNet's prediction (B, C, h, w) with the reference image's tokens in every cross-attention."""
    parts = getattr(models["ip_adapter"], "module", models["ip_adapter"])  # unwrap DDP
    encoder = parts.encoder
    reference = batch["reference"].to(noisy.device)  # (B, 3, H, W) in [0, 1]
    with torch.no_grad():
        pixels = clip_pixels(reference, encoder.config.image_size).to(encoder.dtype)
        embeds = encoder(pixel_values=pixels).image_embeds  # (B, D)
    drop = torch.rand(embeds.shape[0], generator=generator) < config.conditioning.image_dropout  # (B,)
    embeds = embeds * (~drop).to(embeds.device, embeds.dtype)[:, None]
    added = dict(kwargs.get("added_cond_kwargs", {}))
    added["image_embeds"] = [embeds[:, None].float()]  # one IP-Adapter: (B, 1 image, D)
    rest = {key: value for key, value in kwargs.items() if key != "added_cond_kwargs"}
    return models["ip_adapter"](unet, noisy, timesteps, **rest, added_cond_kwargs=added, return_dict=False)[0]


def weights(unet: Any) -> dict[str, torch.Tensor]:
    """The trained weights in the IP-Adapter file layout (the inverse of diffusers' conversion)."""
    proj = unet.encoder_hid_proj.image_projection_layers[0]
    tensors = {
        "image_proj.proj.weight": proj.image_embeds.weight,
        "image_proj.proj.bias": proj.image_embeds.bias,
        "image_proj.norm.weight": proj.norm.weight,
        "image_proj.norm.bias": proj.norm.bias,
    }
    key_id = 1
    for processor in unet.attn_processors.values():
        if hasattr(processor, "to_k_ip"):
            tensors[f"ip_adapter.{key_id}.to_k_ip.weight"] = processor.to_k_ip[0].weight
            tensors[f"ip_adapter.{key_id}.to_v_ip.weight"] = processor.to_v_ip[0].weight
            key_id += 2
    return {key: value.detach().float().cpu().contiguous() for key, value in tensors.items()}


def save(models: dict[str, Any], pipe: Any, family: str, output: Path, config: Any) -> list[Path]:
    from safetensors.torch import save_file

    parts = models["ip_adapter"]
    path = output / WEIGHT_FILE
    partial = path.with_name(path.name + ".partial")
    info = {"method": "ip-adapter", "family": family, "base_model": config.model, "num_tokens": NUM_TOKENS}
    save_file(weights(pipe.unet), str(partial), metadata={"personalize": json.dumps(info, sort_keys=True)})
    partial.replace(path)
    encoder_dir = output / "image_encoder"
    parts.encoder.save_pretrained(str(encoder_dir), safe_serialization=True)
    return [path, encoder_dir]


def restore(pipe: Any, side: dict[str, Any]) -> None:
    """Put the UNet's attention processors and (absent) image projection back as they were."""
    parts = side["ip_adapter"]
    unet = pipe.unet
    unet.set_attn_processor(dict(parts.originals))  # a copy: diffusers pops the entries it assigns
    unet.encoder_hid_proj = None
    unet.config.encoder_hid_dim_type = None


def reinstall(pipe: Any, side: dict[str, Any]) -> None:
    """After a mid-run sample (restore, sample from the saved file, unload): the trained processors and
    image projection back into the UNet, so that training goes on with the same modules."""
    parts = side["ip_adapter"]
    unet = pipe.unet
    processors = dict(parts.originals)  # e.g. xformers, as this run set it; unloading reset them to defaults
    processors.update(zip(parts.names, parts.processors))
    unet.set_attn_processor(processors)
    unet.encoder_hid_proj = parts.image_proj
    unet.config.encoder_hid_dim_type = "ip_image_proj"
