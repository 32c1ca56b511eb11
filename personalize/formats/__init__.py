"""Pure state_dict -> state_dict converters between our adapters and foreign file layouts.

save_adapter(folder, components, method=..., family=..., hyper=...) writes the layouts other tools read;
read_adapter(path, pipe_or_model) reads any of them back onto a pipeline or model (see io.py).
"""

from personalize.formats.io import AdapterFile, model_components, read_adapter, save_adapter

__all__ = ["AdapterFile", "model_components", "read_adapter", "save_adapter"]
