"""The injection core: attach adapters of any method to any torch model, by functions.

from personalize import adapters
adapters.inject(unet, "lokr", targets="attention", name="subject", rank=8, alpha=8, factor=-1)
adapters.set_scale(unet, "subject", 0.7); adapters.merge(unet, "subject"); adapters.unmerge(unet, "subject")
sd = adapters.state_dict(unet, "subject"); adapters.load_state_dict(unet, sd, "subject")
adapters.remove(unet, "subject")
"""

from personalize.adapters.from_weights import describe, group_by_module, inject_from_state_dict
from personalize.adapters.inject import (
    METHODS,
    inject,
    load_state_dict,
    merge,
    remove,
    set_scale,
    state_dict,
    trainable_parameters,
    unmerge,
)
from personalize.adapters.layer import AdapterLayer
from personalize.adapters.native import load_native, save_native
from personalize.adapters.quant import QUANT_MODES, dequantized_weight, quantize, quantize_unet
from personalize.adapters.training import calibrate, finish, follow_optimizer, regularization

__all__ = [
    "METHODS",
    "QUANT_MODES",
    "AdapterLayer",
    "calibrate",
    "dequantized_weight",
    "finish",
    "follow_optimizer",
    "regularization",
    "describe",
    "group_by_module",
    "inject",
    "inject_from_state_dict",
    "load_native",
    "load_state_dict",
    "merge",
    "quantize",
    "quantize_unet",
    "remove",
    "save_native",
    "set_scale",
    "state_dict",
    "trainable_parameters",
    "unmerge",
]
