"""The mini DreamBench's figures as a Markdown table and two matplotlib plots (from run.py's JSON)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

AXES = ("subject", "prompt", "in_context", "class_accuracy")


def summarize(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """method -> mean (over subjects and training seeds) of each axis, its spread, drift and seconds."""
    runs = results["runs"]
    base = {subject: entries[0]["class_accuracy"] for subject, entries in runs["no training"].items()}
    table = {}
    for method, subjects in runs.items():
        rows = [(subject, entry) for subject, entries in subjects.items() for entry in entries]
        summary = {axis: float(np.mean([entry[axis] for _, entry in rows])) for axis in AXES}
        summary["drift"] = float(np.mean([base[subject] - entry["class_accuracy"] for subject, entry in rows]))
        spread = [entry["in_context"] for _, entry in rows]
        summary["in_context_min"], summary["in_context_max"] = float(min(spread)), float(max(spread))
        summary["seconds"] = float(np.mean([entry["seconds"] for _, entry in rows]))
        summary["runs"] = len(rows)
        table[method] = summary
    return table


def markdown_table(table: dict[str, dict[str, float]]) -> str:
    header = ["method", "subject in new contexts", "subject fidelity", "prompt fidelity", "class accuracy"]
    header += ["drift vs base", "train s", "runs"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, row in table.items():
        spread = f" ({row['in_context_min']:.2f}-{row['in_context_max']:.2f})" if row["runs"] > 1 else ""
        lines.append(
            f"| {method} | {row['in_context']:.2f}{spread} | {row['subject']:.2f} | {row['prompt']:.2f} | "
            f"{row['class_accuracy']:.2f} | {row['drift']:+.2f} | {row['seconds']:.0f} | {row['runs']} |"
        )
    return "\n".join(lines)


def calibration_table(calibration: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = ["| generator | subject | prompt | in context | class accuracy |", "|---|---|---|---|---|"]
    names = list(next(iter(calibration.values())))
    for name in names:
        values = [np.mean([calibration[subject][name][axis] for subject in calibration]) for axis in AXES]
        lines.append(f"| {name} | " + " | ".join(f"{value:.2f}" for value in values) + " |")
    return "\n".join(lines)


def plots(table: dict[str, dict[str, float]], folder: Path, stem: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    methods = list(table)
    x = np.arange(len(methods))
    figure, axes = pyplot.subplots(figsize=(10, 4), dpi=100)
    for offset, (axis, label) in enumerate(
        [("in_context", "in new context"), ("subject", "subject fidelity"), ("prompt", "prompt fidelity")]
    ):
        axes.bar(x + (offset - 1) * 0.27, [table[m][axis] for m in methods], width=0.27, label=label)
    axes.axhline(0.5, color="gray", linestyle="--", linewidth=0.8)
    axes.set_xticks(x, methods, rotation=25, ha="right", fontsize=8)
    axes.set_ylim(0, 1.05)
    axes.set_ylabel("share of images")
    axes.legend(fontsize=8)
    figure.tight_layout()
    bars = folder / f"{stem}_axes.png"
    figure.savefig(bars)
    pyplot.close(figure)

    figure, axes = pyplot.subplots(figsize=(6, 4.5), dpi=100)
    for method in methods:
        axes.scatter(table[method]["drift"], table[method]["in_context"])
        axes.annotate(method, (table[method]["drift"], table[method]["in_context"]), fontsize=7)
    axes.axvline(0.05, color="gray", linestyle="--", linewidth=0.8)
    axes.axhline(0.5, color="gray", linestyle="--", linewidth=0.8)
    axes.set_xlabel("drift: base class accuracy - adapted class accuracy (lower is better)")
    axes.set_ylabel("subject in new contexts (higher is better)")
    figure.tight_layout()
    trade = folder / f"{stem}_tradeoff.png"
    figure.savefig(trade)
    pyplot.close(figure)
    return [bars, trade]


def pretrain_plot(probes: list[dict[str, float]], path: Path) -> Path:
    """Prompt following of the base while it pretrained (pretrain.py's probes): share right vs step."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    steps = [probe["step"] for probe in probes]
    figure, axes = pyplot.subplots(figsize=(6, 4), dpi=100)
    keys = [("context", "context"), ("colour", "colour"), ("shape", "shape"), ("all", "all three")]
    keys += [("two_tone", "both colours of a two-colour prompt")]
    for key, label in keys:
        if all(key in probe for probe in probes):  # probes of the first world had no two-colour prompts
            axes.plot(steps, [probe[key] for probe in probes], marker="o", markersize=3, label=label)
    for chance in (1 / 6, 1 / 4, 1 / 3):  # a generator guessing the context, the colour, the shape
        axes.axhline(chance, color="gray", linestyle=":", linewidth=0.6)
    axes.set_xlabel("denoiser steps (batch 32)")
    axes.set_ylabel("share of probe images right (EMA weights)")
    axes.set_ylim(0, 1.05)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path)
    pyplot.close(figure)
    return path


def write_report(results: dict[str, Any], path: Path) -> Path:
    """Writes the tables (and the plots beside the file) into `path`'s generated block."""
    table = summarize(results)
    subjects = ", ".join(results["calibration"])
    images = plots(table, path.parent, path.stem)
    if results.get("pretrain", {}).get("probes"):
        images.append(pretrain_plot(results["pretrain"]["probes"], path.parent / f"{path.stem}_pretrain.png"))
    block = "\n".join(
        [
            "<!-- generated by benchmarks/dreambench_mini/run.py -->",
            markdown_table(table),
            "",
            f"Calibration of the measures (generators whose answer is known, 4 seeds, subjects: {subjects}):",
            "",
            calibration_table(results["calibration"]),
            "",
            *[f"![{image.stem}]({image.name})" for image in images],
            "<!-- end of generated block -->",
        ]
    )
    begin, finish = "<!-- generated by benchmarks/dreambench_mini/run.py -->", "<!-- end of generated block -->"
    text = path.read_text() if path.is_file() else f"# Mini DreamBench\n\n{begin}\n{finish}\n"
    start, end = text.index(begin), text.index(finish) + len(finish)
    path.write_text(text[:start] + block + text[end:])
    return path


def merge(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One results dict from several run.py outputs (methods run in parallel processes): runs side by side."""
    merged: dict[str, Any] = {"runs": {}, "calibration": {}}
    for part in parts:
        merged["calibration"].update(part.get("calibration", {}))
        merged["pretrain"] = part.get("pretrain", merged.get("pretrain"))
        for method, subjects in part["runs"].items():
            merged["runs"].setdefault(method, {}).update(subjects)
    return merged


def main(argv: list[str] | None = None) -> None:
    """python -m benchmarks.dreambench_mini.report PART.json ... --output benchmarks/results/dreambench_mini.md"""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("parts", nargs="+", type=Path)
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args(argv)
    results = merge([json.loads(part.read_text()) for part in args.parts])
    args.output.with_suffix(".json").write_text(json.dumps(results, indent=1))
    print(f"wrote {write_report(results, args.output)}")


if __name__ == "__main__":
    main()
