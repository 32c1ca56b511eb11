"""personalize.pipelines: inference only; loads our outputs into stock diffusers pipelines.

    from personalize.pipelines import load_adapter, unload_adapter, fuse, unfuse, set_adapter_scale
    load_adapter(pipe, "out/cat", scale=1.0, name="cat")
    pipe = with_controlnet(pipe, "out/canny")    # also with_t2i_adapter, with_ip_adapter, compose
    load_adapter(pipe, "out/pose"); set_control_image(pipe, edges)   # a ControlNeXt run

The names are imported on first use, so that the CLI shell (which imports `personalize.pipelines.cli`
to register `generate`) does not pay for torch at `--help`.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from personalize.pipelines.conditioning import compose, with_controlnet, with_ip_adapter, with_t2i_adapter
    from personalize.pipelines.controlnext import set_control_image
    from personalize.pipelines.load import (
        LoadedAdapter,
        describe_adapters,
        fuse,
        load_adapter,
        loaded_adapters,
        set_adapter_scale,
        unfuse,
        unload_adapter,
    )

__all__ = [
    "LoadedAdapter",
    "describe_adapters",
    "fuse",
    "load_adapter",
    "loaded_adapters",
    "set_adapter_scale",
    "unfuse",
    "unload_adapter",
    "compose",
    "with_controlnet",
    "with_ip_adapter",
    "with_t2i_adapter",
    "set_control_image",
]
CONDITIONING = {"compose", "with_controlnet", "with_ip_adapter", "with_t2i_adapter"}  # pipelines/conditioning.py


def __getattr__(name: str) -> Any:
    if name == "set_control_image":  # pipelines/controlnext.py
        return getattr(importlib.import_module("personalize.pipelines.controlnext"), name)
    if name in CONDITIONING:
        return getattr(importlib.import_module("personalize.pipelines.conditioning"), name)
    if name in __all__:
        return getattr(importlib.import_module("personalize.pipelines.load"), name)
    raise AttributeError(f"module 'personalize.pipelines' has no attribute '{name}'")
