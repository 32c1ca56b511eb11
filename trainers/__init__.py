"""personalize.trainers: one training recipe per file on a small shared loop.

`train(images=..., model=..., method=..., **options)` runs the DreamBooth / adapter recipe (the
same one `personalize train` runs) and returns a TrainResult (output dir, files, metrics).
"""

from typing import Any


def train(config: Any = None, **options: Any) -> Any:
    """See personalize.trainers.dreambooth.train (imported lazily: `import personalize.trainers` stays cheap).

    method controlnet / t2i-adapter / ip-adapter runs personalize.trainers.conditioning.train."""
    from personalize.trainers.conditioning_config import CONDITIONING_METHODS

    if getattr(config, "method", options.get("method")) in CONDITIONING_METHODS:
        from personalize.trainers.conditioning import train as run
    else:
        from personalize.trainers.dreambooth import train as run

    return run(config, **options)


__all__ = ["train"]
