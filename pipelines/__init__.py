"""personalize.pipelines: inference only; loads our outputs into stock diffusers pipelines.

from personalize.pipelines import load_adapter, unload_adapter, fuse, unfuse, set_adapter_scale
load_adapter(pipe, "out/cat", scale=1.0, name="cat")
"""

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
]
