"""personalize.trainers: one training recipe per file on a small shared loop.

`train(images=..., model=..., method=..., **options)` runs the DreamBooth / adapter recipe (the
same one `personalize train` runs) and returns a TrainResult (output dir, files, metrics).
"""

from typing import Any


def train(config: Any = None, **options: Any) -> Any:
    """See personalize.trainers.dreambooth.train (imported lazily: `import personalize.trainers` stays cheap)."""
    from personalize.trainers.dreambooth import train as run

    return run(config, **options)


__all__ = ["train"]
