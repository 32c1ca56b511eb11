"""Load a ControlNeXt run (`controlnext.safetensors`) into a stock diffusers pipeline.

    load_adapter(pipe, "out/pose")                 # routes here: the module + the UNet's trained values
    set_control_image(pipe, edges, strength=1.0)   # what `--control-image` does; then pipe(prompt)

The UNet's trained subset loads as a selective adapter (scalable, unloadable, like our bitfit files);
the conditioning module runs inside the UNet through forward hooks (personalize.adapters.controlnext),
so any stock text-to-image pipeline over that UNet is steered by the control image.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from personalize.adapters import controlnext as core
from personalize.errors import UserError

WEIGHT_FILE = "controlnext.safetensors"


def controlnext_file(path: Any) -> Path | None:
    """The ControlNeXt file of a run folder or the file itself, else None."""
    if not isinstance(path, (str, Path)):
        return None
    path = Path(path).expanduser()
    file = path / WEIGHT_FILE if path.is_dir() else path
    return file if file.is_file() and file.name.endswith(".safetensors") and _is_controlnext(file) else None


def _is_controlnext(file: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as handle:
            info = json.loads((handle.metadata() or {}).get("personalize", "{}"))
    except Exception:  # not a readable safetensors file: the other readers report it
        return False
    return isinstance(info, dict) and info.get("method") == "controlnext"


def read(file: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(metadata info, module state, UNet parameter values) of a ControlNeXt file."""
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as handle:
        info = json.loads((handle.metadata() or {})["personalize"])
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    module = {
        key.removeprefix("controlnext."): value for key, value in tensors.items() if key.startswith("controlnext.")
    }
    unet = {key.removeprefix("unet."): value for key, value in tensors.items() if key.startswith("unet.")}
    return info, module, unet


def load(pipe: Any, file: Path, scale: float, name: str) -> list[str]:
    """Attach the module and load the UNet values under `name`; returns the components touched."""
    from personalize.pipelines.load import _inject_selective

    unet = getattr(pipe, "unet", None)
    if unet is None or not hasattr(unet, "down_blocks"):
        raise UserError(f"{file}: a ControlNeXt steers a UNet; {type(pipe).__name__} has none")
    info, module_state, unet_values = read(file)
    module = core.ControlNeXt(**info["controlnext"])
    try:
        module.load_state_dict(module_state, strict=True)
    except RuntimeError as error:
        raise UserError(f"{file}: the ControlNeXt weights do not match their config ({str(error)[:200]})") from None
    parameter = next(unet.parameters())
    module.to(parameter.device, parameter.dtype).eval().requires_grad_(False)
    vae = getattr(pipe, "vae", None)
    factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 8
    core.attach(unet, module, factor)  # checks the width against the UNet's first block
    try:
        if unet_values:
            _inject_selective(unet, unet_values, name, scale, "unet")
    except BaseException:
        core.detach(unet)
        raise
    module.scale *= scale  # the adapter's scale weakens the control as it does the UNet values
    return ["unet"] if unet_values else []


def set_control_image(pipe: Any, image: Any, strength: float = 1.0) -> None:
    """The control image (PIL or (3, H, W) / (B, 3, H, W) tensor in [0, 1]) for the next generations;
    `strength` multiplies the trained scale (0: no control)."""
    unet = getattr(pipe, "unet", None)
    if unet is None or core.attached(unet) is None:
        raise UserError("--control-image needs --controlnet DIR or a ControlNeXt --adapter (a controlnext run)")
    if not isinstance(image, torch.Tensor):
        import numpy as np

        image = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)
    tensor = image if image.dim() == 4 else image[None]  # (B, 3, H, W)
    core.set_control(unet, tensor, strength)


def unload(pipe: Any) -> None:
    """Take the module out of the UNet (its selective values are unloaded by `unload_adapter`)."""
    unet = getattr(pipe, "unet", None)
    if unet is not None:
        core.detach(unet)
