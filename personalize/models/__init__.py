"""Base models: load them, tell their family, and build tiny offline ones for tests and the demo."""

from personalize.models.family import DIFFUSION_FAMILIES, FAMILIES, LANGUAGE_FAMILIES, detect_family, native_resolution
from personalize.models.load import load_language_model, load_pipeline
from personalize.models.tiny import TINY_DIFFUSION, TINY_LANGUAGE, TINY_MODELS, build_tiny, is_tiny, save_tiny

__all__ = [
    "DIFFUSION_FAMILIES",
    "FAMILIES",
    "LANGUAGE_FAMILIES",
    "TINY_DIFFUSION",
    "TINY_LANGUAGE",
    "TINY_MODELS",
    "build_tiny",
    "detect_family",
    "is_tiny",
    "load_language_model",
    "load_pipeline",
    "native_resolution",
    "save_tiny",
]
