"""Reading a job file: YAML (top-level defaults + a `jobs:` list) or CSV (a header of keys, one job per row).

    model: tiny-sd15            # defaults: any `personalize train` key, or `preset: NAME`
    prior_preservation: true
    jobs:
      - images: photos/*        # a glob: one job per matching folder
      - images: photos/sks_dog
        name: dog-rank8         # optional; default: the folder's name
        rank: 8

Every entry remembers its line (and the line of each of its keys), so that a problem found later is
reported where the user can fix it. Values are kept as written; `personalize.batch.jobs` resolves them.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from personalize.config import parse_overrides
from personalize.errors import UserError

GLOB_CHARS = set("*?[")


@dataclass
class JobEntry:
    """One job as written: its keys (flat or nested), where it was written, its explicit name if any."""

    options: dict[str, Any]
    line: int = 0  # 1-based line in the job file; 0 = given from Python
    key_lines: dict[str, int] = field(default_factory=dict)


@dataclass
class JobFile:
    defaults: dict[str, Any]
    entries: list[JobEntry]
    source: str  # the file name used in messages ('' when given from Python)
    base_dir: Path  # relative paths in the file are relative to its folder
    default_lines: dict[str, int] = field(default_factory=dict)


def read_job_file(path: str | Path) -> JobFile:
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"job file {path} does not exist; pass a jobs.yaml or jobs.csv")
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        return _read_yaml(path)
    if suffix == ".csv":
        return _read_csv(path)
    raise UserError(f"{path}: a job file ends in .yaml, .yml or .csv")


def _key_lines(node: Any) -> dict[str, int]:
    if not isinstance(node, yaml.MappingNode):
        return {}
    return {key.value: key.start_mark.line + 1 for key, _ in node.value if isinstance(key, yaml.ScalarNode)}


def _read_yaml(path: Path) -> JobFile:
    text = path.read_text(encoding="utf-8", errors="replace")
    try:
        data = yaml.safe_load(text)
        root = yaml.compose(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        raise UserError(f"{where}: not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("jobs"), list) or not data["jobs"]:
        raise UserError(f"{path}: a job file is a mapping with a non-empty 'jobs:' list (each: images: FOLDER, ...)")
    jobs_node = next(value for key, value in root.value if key.value == "jobs")
    entries = []
    for item, node in zip(data.pop("jobs"), jobs_node.value):
        line = node.start_mark.line + 1
        if isinstance(item, str):  # `- photos/cat`: just a folder
            item = {"images": item}
        if not isinstance(item, dict):
            raise UserError(f"{path}:{line}: a job is a mapping like {{images: FOLDER, steps: 400}}, not {item!r}")
        entries.append(JobEntry(item, line, _key_lines(node)))
    return JobFile(data, entries, path.name, path.parent.absolute(), _key_lines(root))


def _read_csv(path: Path) -> JobFile:
    with path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames or "images" not in [name.strip() for name in reader.fieldnames]:
            raise UserError(f"{path}: the first row names the columns, one of them 'images' (e.g. images,steps,rank)")
        entries = []
        for row in reader:
            cells = [f"{key.strip()}={value.strip()}" for key, value in row.items() if key and value and value.strip()]
            if None in row:  # more cells than columns
                raise UserError(f"{path}:{reader.line_num}: more cells than column names")
            if cells:
                options = parse_overrides(cells)  # 'data.flip=0.5' -> nested; values parsed as YAML scalars
                entries.append(JobEntry(options, reader.line_num, {key: reader.line_num for key in options}))
    if not entries:
        raise UserError(f"{path}: no job rows under the header")
    return JobFile({}, entries, path.name, path.parent.absolute())


def from_python(jobs: list[Any], defaults: dict[str, Any] | None = None) -> JobFile:
    """`personalize.batch.run([{"images": "photos/cat", "steps": 50}, "photos/dog"], defaults={...})`."""
    entries = []
    for number, job in enumerate(jobs):
        options = {"images": str(job)} if isinstance(job, (str, Path)) else job
        if not isinstance(options, dict):
            raise UserError(f"jobs[{number}] must be a folder or a mapping of train keys, not {type(job).__name__}")
        entries.append(JobEntry(dict(options)))
    return JobFile(dict(defaults or {}), entries, "", Path.cwd())


def expand_images(pattern: str, base_dir: Path) -> list[Path]:
    """A folder, or a glob of folders (sorted), relative to `base_dir`; [] when a glob matches none."""
    path = Path(pattern).expanduser()
    if not path.is_absolute():
        path = base_dir / path
    if not GLOB_CHARS & set(pattern):
        return [path]
    anchor = Path(path.anchor)
    return sorted(match for match in anchor.glob(str(path.relative_to(anchor))) if match.is_dir())
