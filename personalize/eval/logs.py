"""Training logs people can watch: accelerate's trackers (TensorBoard, Weights & Biases) and loss.png.

    start_trackers(accelerator, "tensorboard", run_dir, config_values)   # OUT/logs/<run name>/
    log_values(accelerator, {"loss": 0.1, "lr": 1e-4, "grad_norm": 0.3}, step)
    log_image(accelerator, "samples", pil_image, step)
    write_loss_plot(losses, OUT / "loss.png")

Neither tracker is a hard dependency (extra `logs`: tensorboard + matplotlib; wandb: `pip install
wandb`). The trackers are accelerate's own classes, so they log exactly what diffusers' scripts'
`--report_to` logs to; they are added to `accelerator.trackers`, so `accelerator.log` reaches them.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from personalize.errors import UserError

REPORT_TO = ("none", "tensorboard", "wandb")
INSTALL = {
    "tensorboard": "pip install 'personalize[logs]' (or: pip install tensorboard)",
    "wandb": "pip install wandb (then `wandb login`, or WANDB_MODE=offline)",
}
SMOOTHING = 0.9  # exponential moving average of the plotted loss (what TensorBoard's slider shows at 0.9)


def check_report_to(report_to: str) -> None:
    """Before anything loads: a known tracker whose package is installed, else one line saying what to do."""
    if report_to not in REPORT_TO:
        raise UserError(f"--report-to {report_to}: choose one of {', '.join(REPORT_TO)}")
    if report_to != "none" and importlib.util.find_spec(report_to) is None:
        raise UserError(f"--report-to {report_to} needs the {report_to} package: {INSTALL[report_to]}")


def start_trackers(accelerator: Any, report_to: str, run_dir: Path, config: dict[str, Any] | None = None) -> None:
    """Start accelerate's tracker for `report_to` (once per accelerator; "none" starts nothing)."""
    if report_to == "none" or accelerator.trackers:
        return
    check_report_to(report_to)
    from accelerate.tracking import TensorBoardTracker, WandBTracker

    run_name = run_dir.name or "run"
    if report_to == "tensorboard":
        tracker = TensorBoardTracker(run_name, run_dir / "logs")
    else:
        tracker = WandBTracker(run_name, dir=str(run_dir))
    if accelerator.is_main_process:
        tracker.start()
        if config:
            tracker.store_init_configuration(_flat(config))
    accelerator.trackers.append(tracker)


def log_values(accelerator: Any, values: dict[str, float], step: int) -> None:
    if accelerator.trackers:
        accelerator.log(values, step=step)


def log_image(accelerator: Any, tag: str, image: Any, step: int) -> None:
    """One image (PIL, or a PNG path: a sample grid, a contact sheet) to every tracker."""
    if not accelerator.trackers or not accelerator.is_main_process:
        return
    import numpy as np
    from PIL import Image

    if isinstance(image, (str, Path)):
        with Image.open(image) as opened:
            image = opened.convert("RGB")
    array = np.asarray(image.convert("RGB"))  # (H, W, 3) uint8
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({tag: array[None]}, step=step, dataformats="NHWC")
            tracker.writer.flush()
        else:
            tracker.log_images({tag: [array]}, step=step)


def _flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"data.resolution": 512, ...} with only the types trackers store (lists as text)."""
    flat: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flat(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)) or value is None:
            flat[name] = "" if value is None else value
        else:
            flat[name] = str(value)
    return flat


def smoothed(values: Sequence[float], weight: float = SMOOTHING) -> list[float]:
    """Debiased exponential moving average: s_t = w s_(t-1) + (1 - w) x_t, divided by 1 - w^t."""
    out, average = [], 0.0
    for index, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        out.append(average / (1 - weight**index))
    return out


def write_loss_plot(losses: Sequence[float], path: Path, say: Any = print) -> Path | None:
    """loss.png: the loss of every optimizer step and its moving average; a note instead without matplotlib."""
    if not losses:
        return None
    if importlib.util.find_spec("matplotlib") is None:
        say(f"note: loss.png needs matplotlib: {INSTALL['tensorboard'].split(' (')[0]}")
        return None
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(figsize=(6, 3.5), dpi=100)
    steps = range(1, len(losses) + 1)
    axes.plot(steps, losses, color="#9ab", linewidth=0.8, label="loss")
    axes.plot(steps, smoothed(losses), color="#147", linewidth=1.6, label=f"moving average ({SMOOTHING})")
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("loss")
    axes.grid(alpha=0.3)
    axes.legend(loc="upper right")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    pyplot.close(figure)
    return path
