"""From a job file to validated, resolved jobs: every problem found before anything trains, with its line.

A job's config is layered like `personalize train`'s: the preset (the job's, else the defaults') < the
file's defaults < the job's own keys < `--set` overrides. Keys may be nested (`data: {flip: 0.5}`), flat
(`resolution: 64`, as `train(**options)` takes them) or flag names (`class_images: 50`). Then each job
is resolved exactly as `personalize train` would resolve it (token and class word from the folder name,
method defaults), its images are scanned (unreadable ones named), and it gets a fingerprint: its
resolved config plus the content of every image and caption it trains on. A finished job whose
fingerprint has not changed is skipped on a rerun.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from personalize.batch.jobfile import JobEntry, JobFile, expand_images
from personalize.config import from_dict, merge, nearest, parse_overrides, read_preset, to_dict
from personalize.errors import UserError

NOT_TRAIN_KEYS = ("name", "preset", "jobs")
PATH_KEYS = (("data", "images"), ("data", "class_dir"), ("data", "cache_dir"), ("conditioning", "folder"))
PATH_KEYS += (("conditioning", "reference"), ("output",))


@dataclass
class Job:
    name: str
    line: int  # where the job is written (0: given from Python)
    where: str  # "jobs.yaml:12" or "jobs[3]": the prefix of its messages
    config: dict[str, Any] = field(default_factory=dict)  # the resolved TrainConfig as plain data
    fingerprint: str = ""
    images: int = 0
    notes: list[str] = field(default_factory=list)  # token / class word taken from the folder name
    warnings: list[str] = field(default_factory=list)  # unreadable images (skipped, as train skips them)
    problem: str = ""  # why the job cannot run; '' = valid

    @property
    def output(self) -> Path:
        return Path(self.config.get("output", ""))


def _train_keys() -> tuple[dict[str, set[str]], dict[str, str]]:
    """({section: its keys} with '' = top level, {flag name: dotted key}) of `personalize train`."""
    from personalize.data import DataConfig
    from personalize.trainers.cli import FLAG_KEYS
    from personalize.trainers.conditioning.config import ConditioningConfig
    from personalize.trainers.diffusion.config import TrainConfig

    sections = {
        "": {item.name for item in dataclasses.fields(TrainConfig)},
        "data": {item.name for item in dataclasses.fields(DataConfig)},
        "conditioning": {item.name for item in dataclasses.fields(ConditioningConfig)},
    }
    return sections, dict(FLAG_KEYS)


def nest(options: dict[str, Any], where: str, key_lines: dict[str, int], source: str) -> dict[str, Any]:
    """Flat data keys, flag names and dotted keys -> the nested TrainConfig layout; unknown keys are errors."""
    sections, flags = _train_keys()
    nested: dict[str, Any] = {}
    for key, value in options.items():
        if key in NOT_TRAIN_KEYS:
            continue
        if key in sections and key and isinstance(value, dict):
            for inner in value:
                if inner not in sections[key]:
                    here = f"{source}:{key_lines[key]}" if key in key_lines and source else where
                    raise UserError(f"{here}: unknown key '{key}.{inner}'{nearest(inner, sections[key], key + '.')}")
            nested = merge(nested, {key: value})
            continue
        dotted = key if key in sections[""] else flags.get(key) or ("data." + key if key in sections["data"] else "")
        if not dotted:
            here = f"{source}:{key_lines[key]}" if key in key_lines and source else where
            known = sections[""] | sections["data"] | set(flags)
            raise UserError(f"{here}: unknown key '{key}'{nearest(key, known)}")
        nested = merge(nested, _dotted(dotted, value))
    return nested


def _dotted(key: str, value: Any) -> dict[str, Any]:
    *parents, leaf = key.split(".")
    result: dict[str, Any] = {leaf: value}
    for parent in reversed(parents):
        result = {parent: result}
    return result


def _absolute_paths(nested: dict[str, Any], base_dir: Path) -> dict[str, Any]:
    """Paths written in a job file are relative to the file's folder, not to where the command runs."""
    result = json.loads(json.dumps(nested, default=str))
    for keys in PATH_KEYS:
        holder = result
        for key in keys[:-1]:
            holder = holder.get(key) if isinstance(holder.get(key), dict) else {}
        value = holder.get(keys[-1])
        if isinstance(value, str) and value and not Path(value).expanduser().is_absolute():
            holder[keys[-1]] = str(base_dir / Path(value).expanduser())
    return result


def expand(spec: JobFile) -> list[tuple[JobEntry, str, Path | None, str]]:
    """(entry, name, images folder, problem) per job, globs expanded into one job per folder."""
    out: list[tuple[JobEntry, str, Path | None, str]] = []
    for entry in spec.entries:
        images = entry.options.get("images", spec.defaults.get("images"))
        if not images:
            out.append((entry, str(entry.options.get("name", "?")), None, "no 'images: FOLDER' given"))
            continue
        folders = expand_images(str(images), spec.base_dir)
        if not folders:
            out.append((entry, str(entry.options.get("name", images)), None, f"images: {images} matches no folder"))
            continue
        for folder in folders:
            name = entry.options["name"] if "name" in entry.options and len(folders) == 1 else folder.name
            out.append((entry, str(name), folder, ""))
    return out


def prepare(
    spec: JobFile,
    root: Path,
    *,
    preset: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    cache_dir: str | None = None,
) -> list[Job]:
    """Resolve and validate every job of `spec` (nothing is loaded or trained); invalid jobs carry a problem."""
    defaults = {key: value for key, value in spec.defaults.items() if key not in ("preset", "output")}
    default_preset = spec.defaults.get("preset") or preset
    jobs: list[Job] = []
    for number, (entry, name, folder, problem) in enumerate(expand(spec)):
        where = f"{spec.source}:{entry.line}" if spec.source else f"jobs[{number}]"
        job = Job(name=name, line=entry.line, where=where, problem=problem)
        jobs.append(job)
        if problem:
            continue
        try:
            chosen = entry.options.get("preset") or default_preset
            base = read_preset(chosen) if chosen else {}
            layered = merge(
                merge(base, nest(defaults, where, spec.default_lines, spec.source)),
                nest(entry.options, where, entry.key_lines, spec.source),
            )
            layered = merge(_absolute_paths(layered, spec.base_dir), {"data": {"images": str(folder)}})
            layered = merge(layered, parse_overrides(overrides))
            if not layered.get("output"):
                layered["output"] = str(root / name)
            _resolve(job, layered, cache_dir)
        except UserError as error:
            job.problem = str(error).removeprefix(f"{where}: ")
    _check_names(jobs)
    return jobs


def _resolve(job: Job, layered: dict[str, Any], cache_dir: str | None) -> None:
    from personalize.batch.shared import class_request, shared_class_dir
    from personalize.data import cache_root
    from personalize.data.dataset import scan
    from personalize.trainers.diffusion.config import TrainConfig, resolve

    if cache_dir and not layered.get("data", {}).get("cache_dir"):
        layered = merge(layered, {"data": {"cache_dir": cache_dir}})
    config, notes = resolve(from_dict(TrainConfig, layered))
    root = cache_root(config.data.cache_dir or None).absolute()  # one cache for every worker of the batch
    shared: dict[str, Any] = {"cache_dir": str(root)}
    shared_set = config.prior_preservation and not config.data.class_dir
    if shared_set:  # one class-image set per base, class and size
        shared.update(class_dir=shared_class_dir(config, root), num_class_images=class_request(config)[1])
    config = dataclasses.replace(config, data=dataclasses.replace(config.data, **shared))
    records, report = scan(dataclasses.replace(config.data, class_dir="", num_class_images=0))
    if not records:
        raise UserError(f"no usable image in {config.data.images} ({report.summary()})")
    job.config = to_dict(config)
    job.notes = notes
    job.images = len(records)
    job.warnings = [f"{path.name} is unreadable ({reason}); it is skipped" for path, reason in report.skipped]
    content = sorted((record.digest, record.prompt) for record in records)
    # Where the caches live changes no result: the fingerprint holds the shared class-image set's key, not its path.
    settings = {key: value for key, value in job.config.items() if key not in ("resume", "overwrite")}
    data = dict(settings["data"], cache_dir="")
    if shared_set:
        data["class_dir"] = Path(data["class_dir"]).name
    settings["data"] = data
    job.fingerprint = hashlib.sha256(json.dumps([settings, content], sort_keys=True).encode()).hexdigest()[:20]


def _check_names(jobs: list[Job]) -> None:
    """Two jobs may not share a name (their outputs would overwrite each other)."""
    seen: dict[str, Job] = {}
    for job in jobs:
        other = seen.get(job.name)
        if other is not None and not job.problem:
            job.problem = f"job name '{job.name}' is also used at {other.where}; give one of them 'name: ...'"
        seen.setdefault(job.name, job)
    outputs: dict[str, Job] = {}
    for job in jobs:
        if job.problem or not job.config:
            continue
        other = outputs.get(str(job.output))
        if other is not None:
            job.problem = f"output {job.output} is also used by job '{other.name}' ({other.where})"
        outputs.setdefault(str(job.output), job)


def train_config(config: dict[str, Any]) -> Any:
    """A job's TrainConfig, rebuilt from its plain-data form (what a worker receives)."""
    from personalize.trainers.diffusion.config import TrainConfig

    return from_dict(TrainConfig, config)
