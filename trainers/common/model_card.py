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
    adapter: dict[str, Any] | None = None,
) -> str:
    """Markdown text; paths are written relative to `output_dir`."""

    def relative(path: Path) -> str:
        try:
            return str(Path(path).relative_to(output_dir))
        except ValueError:
            return str(path)

    usage = _usage(base_model, method, output_dir, files, adapter, prompt)
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
        f"Rerun exactly with `personalize train --config {output_dir}/config.yaml` (add `--resume` to continue).",
        "",
    ]
    return "\n".join(lines)


def _usage(
    base_model: str, method: str, output_dir: Path, files: list[Path], adapter: dict[str, Any] | None, prompt: str
) -> str:
    """A Python snippet that loads the result into a stock diffusers pipeline."""
    lines = ["```python", "from personalize.models import load_pipeline", "", f'pipe = load_pipeline("{base_model}")']
    tokens = (adapter or {}).get("tokens")
    if tokens:  # textual-inversion / pivotal: the embeddings (and adapter) load together
        lines += [
            "from personalize.pipelines import load_adapter",
            "",
            f'load_adapter(pipe, "{output_dir}")  # the tokens {" ".join(tokens)} (and the adapter)',
            f'# stock diffusers, embeddings only: pipe.load_textual_inversion("{output_dir}")',
        ]
        if (adapter or {}).get("family") == "sdxl":
            lines.append(
                f'# and pipe.load_textual_inversion("{output_dir}", weight_name="learned_embeds_2.safetensors", '
                "text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)"
            )
    elif method == "full":
        lines += [
            "from diffusers import UNet2DConditionModel",
            f'pipe.unet = UNet2DConditionModel.from_pretrained("{output_dir}/unet")',
        ]
    elif method in ("lora", "locon", "dora", "loha", "lokr", "krona", "ia3", "oft", "boft"):
        lines += ["from personalize.pipelines import load_adapter", f'load_adapter(pipe, "{output_dir}")']
        if method in ("lora", "locon", "dora"):
            lines.append(f'# or with diffusers alone: pipe.load_lora_weights("{output_dir}")')
    else:
        adapter = adapter or {}
        hyper = ", ".join(f"{key}={value!r}" for key, value in adapter.get("hyper", {}).items())
        hyper = f", {hyper}" if hyper else ""
        lines += [
            "from safetensors.torch import load_file",
            "from personalize import adapters",
            "",
            f'state = load_file("{files[0]}")',
        ]
        name = adapter.get("name", "default")
        for component in adapter.get("components", ["unet"]):
            targets = adapter.get("targets", "attention") if component == "unet" else "text"
            lines += [
                f'adapters.inject(pipe.{component}, "{method}", targets="{targets}", name="{name}"{hyper})',
                f'adapters.load_state_dict(pipe.{component}, {{k[len("{component}."):]: v for k, v in state.items() '
                f'if k.startswith("{component}.")}}, "{name}")',
            ]
    return "\n".join([*lines, f"image = pipe({prompt!r}).images[0]", "```", ""])
