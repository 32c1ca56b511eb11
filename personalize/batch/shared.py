"""Work that jobs share, done once: the loaded base per worker, and class images per base, class and size.

- `BaseCache`: a worker keeps the pipeline it loaded and hands it to `train(pipe=...)` for every job on
  the same base (train removes its adapters afterwards). Keyed by model and compute precision: a run
  places the text encoders in its precision, and a bf16 round trip would change an fp32 job's weights.
- Class images for prior preservation live in the shared cache, `<cache>/class_images/<key>/`, one set
  per base model + class prompt + resolution (+ count, seed, denoising steps and precision, which also
  change the images), so every subject of a class reuses them, in this batch and the next. Workers that
  need the same set take a file lock: one generates, the others wait and then find it complete.
- Latents and text embeddings need nothing here: `personalize.data.cache` already keys them by image
  content and prompt, writes them atomically, and every job of a batch points at the same cache dir.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def class_request(config: Any) -> tuple[str, int]:
    """(prompt, count) of a job's class images, as the DreamBooth recipe asks for them."""
    data = config.data
    prompt = data.class_prompt or (f"a photo of {data.class_word}" if data.class_word else "")
    return prompt, data.num_class_images or 100


def shared_class_dir(config: Any, cache: Path) -> str:
    prompt, count = class_request(config)
    identity = {
        "model": config.model,
        "prompt": prompt,
        "resolution": config.data.resolution,
        "count": count,
        "seed": config.seed,
        "steps": config.class_image_steps,
        "precision": config.mixed_precision,
    }
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    slug = "".join(char if char.isalnum() else "-" for char in prompt)[:40].strip("-")
    return str(Path(cache).absolute() / "class_images" / f"{slug}-{key}")


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes (and hosts sharing a filesystem that supports flock)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_shared_class_images(pipe: Any, config: Any) -> float:
    """Generate the job's missing class images under the set's lock; returns the seconds spent (waiting included)."""
    if not config.prior_preservation or not config.data.class_dir:
        return 0.0
    from personalize.data import ensure_class_images

    started = time.perf_counter()
    prompt, count = class_request(config)
    folder = Path(config.data.class_dir)
    with file_lock(folder.parent / f"{folder.name}.lock"):
        size = config.data.resolution
        ensure_class_images(
            pipe,
            prompt,
            folder,
            count,
            seed=config.seed,
            num_inference_steps=config.class_image_steps,
            height=size,
            width=size,
        )
    return time.perf_counter() - started


COMPONENTS = ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3")


class BaseCache:
    """The pipelines a worker has loaded, newest `keep` kept (one base of SD size is several GB).

    With `fixed` (a caller's pipeline, `personalize.batch.run(..., pipe=pipe)`), every job trains on it.
    """

    def __init__(self, keep: int = 1, fixed: Any = None) -> None:
        self.keep = keep
        self.fixed = fixed
        self.pipes: dict[tuple[str, str, bool], Any] = {}
        self.components: dict[str, Any] = {}

    @staticmethod
    def key(config: Any) -> tuple[str, str, bool]:
        return (config.model, config.mixed_precision, config.allow_pickle)

    def get(self, config: Any) -> tuple[Any, float]:
        """(pipeline, seconds spent loading it now: 0 when reused)."""
        if self.fixed is not None:
            self.components = {name: getattr(self.fixed, name) for name in COMPONENTS if hasattr(self.fixed, name)}
            return self.fixed, 0.0
        key = self.key(config)
        if key in self.pipes:
            return self.pipes[key], 0.0
        import torch

        from personalize.models import load_pipeline

        while self.pipes and len(self.pipes) >= self.keep:
            self.pipes.pop(next(iter(self.pipes)))
        started = time.perf_counter()
        pipe = load_pipeline(config.model, torch_dtype=torch.float32, allow_pickle=config.allow_pickle)
        self.pipes[key] = pipe
        return pipe, time.perf_counter() - started

    def discard(self, config: Any) -> None:
        """After a failed job: its adapters may still be in the pipeline, so the next job loads it afresh
        (a caller's pipeline gets its components back and the job's adapter removed instead)."""
        if self.fixed is not None:
            from personalize import adapters
            from personalize.errors import UserError

            for name, module in self.components.items():
                setattr(self.fixed, name, module)
                with contextlib.suppress(UserError, KeyError, ValueError, AttributeError):  # failed before injecting
                    adapters.remove(module, config.adapter_name)
        self.pipes.pop(self.key(config), None)
        import gc

        gc.collect()
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
