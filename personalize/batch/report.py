"""What a batch shows and leaves behind: the job table (dry run), one line per finished job, batch.json, batch.md."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

STATUS_ORDER = ("done", "skipped", "failed", "invalid", "pending")


def _cell(value: Any) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(header: list[str], rows: list[list[Any]]) -> str:
    cells = [header, *[[str(value) for value in row] for row in rows]]
    widths = [max(len(row[column]) for row in cells) for column in range(len(header))]
    return "\n".join("  ".join(value.ljust(width) for value, width in zip(row, widths)).rstrip() for row in cells)


def plan_rows(jobs: list[Any], states: dict[str, str], memory: dict[str, str]) -> tuple[list[str], list[list[Any]]]:
    """The dry run's table: what each job will do."""
    header = ["job", "line", "images", "token", "class", "method", "steps", "class images", "output", "will"]
    if memory:
        header.insert(-1, "memory")
    rows = []
    for job in jobs:
        config, data = job.config, job.config.get("data", {})
        prior = data.get("num_class_images") if config.get("prior_preservation") else "-"
        row = [job.name, job.line or "-", job.images, data.get("token", ""), data.get("class_word", "")]
        row += [config.get("method", ""), config.get("steps", ""), prior, config.get("output", "")]
        if memory:
            row.append(memory.get(job.name, "-"))
        rows.append([*row, states.get(job.name, "")])
    return header, rows


def _number(value: Any, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "-"


def result_rows(results: list[dict[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    metrics = sorted({key for result in results for key in (result.get("eval") or {})})
    header = ["job", "status", "time (s)", "steps", "final loss", "output", *metrics, "reason"]
    rows = []
    for result in results:
        figures = result.get("eval") or {}
        row = [result["name"], result["status"], _number(result.get("seconds"), ".1f"), result.get("steps") or "-"]
        row += [_number(result.get("final_loss"), ".4f"), result.get("output", "")]
        row += [_number(figures.get(metric), ".3f") for metric in metrics]
        rows.append([*row, result.get("reason", "")])
    return header, rows


def finished_line(result: dict[str, Any]) -> str:
    status = result["status"]
    if status == "failed":
        return f"failed   {result['name']}: {result['reason']}"
    if status == "skipped":
        return f"skipped  {result['name']}: {result['reason']}"
    resumed = f", resumed from step {result['resumed_from']}" if result.get("resumed_from") else ""
    loss = _number(result.get("final_loss"), ".4f")
    return (
        f"done     {result['name']}: {result.get('steps')} steps in {result['seconds']:.1f} s{resumed}, "
        f"final loss {loss} -> {result['output']}"
    )


def write_reports(root: Path, results: list[dict[str, Any]], source: str, started: float) -> tuple[Path, Path]:
    """batch.json (every field of every job) and batch.md (the table), written atomically."""
    root.mkdir(parents=True, exist_ok=True)
    counts = {status: sum(result["status"] == status for result in results) for status in STATUS_ORDER}
    summary = {
        "job_file": source,
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        "seconds": time.time() - started,
        "counts": {key: value for key, value in counts.items() if value},
        "jobs": results,
    }
    header, rows = result_rows(results)
    counted = ", ".join(f"{value} {key}" for key, value in summary["counts"].items())
    text = f"# personalize batch: {source or 'jobs'}\n\n{counted}; {summary['seconds']:.0f} s in all.\n\n"
    text += markdown_table(header, rows) + "\n"
    paths = (root / "batch.json", root / "batch.md")
    for path, content in zip(paths, (json.dumps(summary, indent=1), text)):
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        partial.write_text(content)
        partial.replace(path)
    return paths
