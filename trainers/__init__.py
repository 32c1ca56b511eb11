"""personalize.trainers: one training recipe per file on a small shared loop.

`train(images=..., model=..., method=..., **options)` runs the DreamBooth / adapter recipe (the
same one `personalize train` runs) and returns a TrainResult (output dir, files, metrics).
"""

from typing import Any


def train(config: Any = None, **options: Any) -> Any:
    """See personalize.trainers.diffusion.dreambooth.train, .flow_matching.train (SD3 / Flux models),
    .textual_inversion.train (--method textual-inversion, pivotal or ed-lora) and .conditioning.train (controlnet,
    t2i-adapter, ip-adapter); imported lazily:
    `import personalize.trainers` stays cheap."""
    from personalize.trainers.conditioning.config import CONDITIONING_METHODS

    method = getattr(config, "method", None) or options.get("method")
    edit_options = getattr(config, "edit", None) or options.get("edit") or {}
    edit = edit_options.get("sources") if isinstance(edit_options, dict) else getattr(edit_options, "sources", "")
    if edit and not _flow_model(config, options):
        from personalize.errors import UserError

        raise UserError("--task edit needs an edit model (a flow-matching DiT family), e.g. --model tiny-flux-kontext")
    if method in ("textual-inversion", "pivotal", "ed-lora"):
        from personalize.trainers.diffusion.textual_inversion import train as run
    elif method in CONDITIONING_METHODS:
        from personalize.trainers.conditioning.recipe import train as run
    elif _flow_model(config, options):
        from personalize.trainers.diffusion.flow_matching import train as run
    else:
        from personalize.trainers.diffusion.dreambooth import train as run

    return run(config, **options)


def _flow_model(config: Any, options: dict[str, Any]) -> bool:
    """SD3 / Flux (a described DiT family: personalize.models.families) train with the flow-matching recipe."""
    from personalize.models.families import check_described, described_family
    from personalize.trainers.diffusion.config import DEFAULT_MODEL

    model = getattr(config, "model", None) or options.get("model") or DEFAULT_MODEL
    if options.get("pipe") is None:
        check_described(model)  # a DiT family without a description: one line, not a UNet recipe failure
    return described_family(model, options.get("pipe")) is not None


__all__ = ["train"]
