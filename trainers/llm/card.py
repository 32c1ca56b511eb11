"""README.md of an LLM/VLM output folder: what was trained, and how to load it (peft or personalize)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def render_llm_card(
    config: Any, family: str, files: list[Path], metrics: dict[str, Any], samples: dict[str, str]
) -> str:
    from personalize.trainers.llm.sft import options_summary

    auto = "AutoModelForImageTextToText" if family == "vlm" else "AutoModelForCausalLM"
    base = config.model
    imports = [f"from transformers import {auto}", "from peft import PeftModel"]
    load_base = f'{auto}.from_pretrained("{base}")'
    if base.startswith("tiny-"):  # built in code, not on the Hub: the snippet must still run as printed
        imports = ["from peft import PeftModel", "from personalize.models import build_tiny"]
        load_base = f'build_tiny("{base}")[0]'
    rows = "\n".join(f"| {key} | {value} |" for key, value in options_summary(config).items())
    native = any(Path(path).name == "personalize_adapter.safetensors" for path in files)
    answers = "\n".join(f"- **{prompt}** -> {answer}" for prompt, answer in samples.items())
    lines = [
        f"# {config.method} instruction tuning of {base}",
        "",
        f"- base model: `{base}` ({family})",
        f"- method: `{config.method}`" + (f" on a 4-bit ({config.quantize}) base (QLoRA)" if config.quantize else ""),
        f"- data: `{config.data}`: {metrics.get('data', '')}",
        f"- files: {', '.join(f'`{Path(path).name}`' for path in files)}"
        + (" (personalize's own layout: peft has no such method)" if native else " (peft layout)"),
        f"- final loss: {metrics.get('final_loss', float('nan')):.4f} after {metrics.get('steps')} steps "
        f"({metrics.get('seconds', 0.0):.0f} s); trainable parameters: {metrics.get('trainable_params', 0):,}",
        "",
        "## Use",
        "",
        *(_native_use(imports, load_base, config.output) if native else _peft_use(imports, load_base, config)),
        "## Sample answers (greedy)",
        "",
        answers or "(none)",
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


def _peft_use(imports: list[str], load_base: str, config: Any) -> list[str]:
    return [
        "With stock peft and transformers:",
        "",
        "```python",
        *imports,
        f"base = {load_base}",
        f'model = PeftModel.from_pretrained(base, "{config.output}")',
        "```",
        "",
        "Or from the command line (streams the answer):",
        "",
        "```",
        f'personalize generate --model {config.model} --adapter {config.output} --prompt "..." --max-new-tokens 64',
        "```",
        "",
    ]


def _native_use(imports: list[str], load_base: str, output: str) -> list[str]:
    ours = [line for line in imports if "peft" not in line] + ["from personalize import adapters"]
    return [
        "With personalize (the same method is injected on the same layers, then the weights load):",
        "",
        "```python",
        *ours,
        f"model = {load_base}",
        f'adapters.load_native(model, "{output}")',
        "```",
        "",
    ]
