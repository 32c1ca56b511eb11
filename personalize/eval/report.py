"""What `personalize eval` writes: eval.json (figures + per-prompt rows), eval.md (tables), contact_sheet.png."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from personalize.images import make_grid, save_png

SHEET_CELL = 256  # contact-sheet images are shrunk to at most this many pixels a side
LABELS = {
    "dino": "DINO (subject)",
    "clip_i": "CLIP-I (subject)",
    "clip_t": "CLIP-T (prompt)",
    "class_dino": "class DINO base vs adapter",
    "class_clip": "class CLIP base vs adapter",
    "drift": "drift (1 - class DINO)",
}


def markdown(figures: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    """The figures as two Markdown tables: overall, then one row per prompt."""
    lines = ["| figure | value |", "|---|---|"]
    lines += [f"| {label} | {figures[key]:.4f} |" for key, label in LABELS.items() if key in figures]
    lines += ["", "| prompt | DINO | CLIP-I | CLIP-T |", "|---|---|---|---|"]
    lines += [f"| {row['prompt']} | {row['dino']:.4f} | {row['clip_i']:.4f} | {row['clip_t']:.4f} |" for row in rows]
    models = figures.get("metric_models", {})
    seeds = figures.get("seeds")
    lines += ["", f"Metric models: DINO {models.get('dino')}, CLIP {models.get('clip')}; {seeds} seeds per prompt."]
    return "\n".join(lines) + "\n"


def contact_sheet(rows: list[tuple[str, list[Any]]], seeds: int) -> Any:
    """One picture: a row per prompt (its label in the PNG metadata), a column per seed."""
    cells = []
    for _, images in rows:
        for image in images:
            copy = image.convert("RGB")
            copy.thumbnail((SHEET_CELL, SHEET_CELL))
            cells.append(copy)
    return make_grid(cells, columns=seeds)


def write_report(
    folder: Path, figures: dict[str, Any], rows: list[dict[str, Any]], images: Any, seeds: int
) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    sheet_rows = [(prompt, shown) for prompt, shown in images.subject.items()]
    sheet_rows += [(f"base: {prompt}", shown) for prompt, shown in images.base_class.items()]
    sheet_rows += [(f"adapter: {prompt}", shown) for prompt, shown in images.adapted_class.items()]
    json_path = folder / "eval.json"
    json_path.write_text(
        json.dumps({"figures": figures, "per_prompt": rows, "sheet_rows": [label for label, _ in sheet_rows]}, indent=1)
    )
    md_path = folder / "eval.md"
    md_path.write_text(markdown(figures, rows))
    info = {"rows": " | ".join(label for label, _ in sheet_rows), "seeds": seeds}
    sheet = save_png(contact_sheet(sheet_rows, seeds), folder / "contact_sheet.png", info)
    return [json_path, md_path, sheet]
