"""The output folder's README.md: what was trained, on what, how to use it (a model card)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def render_model_card(
    *,
    base_model: str,
    family: str,
    method: str,
    trigger: str,
    prompt: str,
    settings: dict[str, Any],
    files: list[Path],
    output_dir: Path,
    samples: list[Path],
    metrics: dict[str, Any],
) -> str:
    """Markdown text; paths are written relative to `output_dir`."""

    def relative(path: Path) -> str:
        try:
            return str(Path(path).relative_to(output_dir))
        except ValueError:
            return str(path)

    usage = (
        "```python\n"
        "from diffusers import DiffusionPipeline\n"
        f'pipe = DiffusionPipeline.from_pretrained("{base_model}")\n'
    )
    if method == "full":
        usage += (
            "from diffusers import UNet2DConditionModel\n"
            f'pipe.unet = UNet2DConditionModel.from_pretrained("{output_dir}/unet")\n'
        )
    else:
        usage += f"# load {relative(files[0])} with personalize.pipelines (adapter method: {method})\n"
    usage += f'image = pipe("{prompt}").images[0]\n```\n'
    rows = "\n".join(f"| {key} | {value} |" for key, value in settings.items())
    lines = [
        f"# {method} personalization of {base_model}",
        "",
        f"- base model: `{base_model}` ({family})",
        f"- method: `{method}`",
        f'- trigger: `{trigger}` -- prompt with e.g. "{prompt}"',
        f"- files: {', '.join(f'`{relative(path)}`' for path in files)}",
        f"- final loss: {metrics.get('final_loss', float('nan')):.4f} after {metrics.get('steps')} steps "
        f"({metrics.get('seconds', 0.0):.0f} s); trainable parameters: {metrics.get('trainable_params', 0):,}",
        "",
        "## Use",
        "",
        usage,
        "## Samples",
        "",
        *[f"![step {relative(path)}]({relative(path)})" for path in samples[-1:]],
        "",
        "## Settings",
        "",
        "| key | value |",
        "| --- | --- |",
        rows,
        "",
        "Rerun exactly with `personalize train --config config.yaml` (from this folder).",
        "",
    ]
    return "\n".join(lines)
