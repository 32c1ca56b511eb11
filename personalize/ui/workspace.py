"""What the UI's buttons do, without Gradio: folders under the root, uploads, and the `personalize`
commands each tab queues. Every path a user names is checked with `inside_root` before it is used.

Layout under ROOT:
    runs/NAME/            one training run: images/ (uploads), the run's own files (adapter, samples, ...)
    generated/N/          one Generate job's images and grid.png
    batch/FILE.yaml       job files; batch/FILE/ the batch's output (batch.json, batch.md, one folder per job)
    .personalize-ui/      the queue's jobs.json, one log per job, Gradio's upload staging
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from personalize.errors import UserError
from personalize.ui import runs
from personalize.ui.jobs import Job, JobQueue, personalize_command
from personalize.ui.safety import IMAGE_SUFFIXES, accept_upload, inside_root, safe_name


@dataclass
class TrainOptions:
    images: str  # folder under the root
    run: str  # run name -> ROOT/runs/NAME
    model: str = "tiny-sd15"
    preset: str = ""
    method: str = ""
    token: str = ""
    class_word: str = ""
    resolution: int = 0  # 0: the model's own
    steps: int = 0  # 0: the method's default
    sample_every: int = 0  # --validate-every
    overwrite: bool = False


@dataclass
class GenerateOptions:
    model: str
    prompt: str
    adapters: list[tuple[str, float]]  # (run folder or adapter file under the root, weight)
    negative_prompt: str = ""
    seed: int = 0
    num_images: int = 4
    steps: int = 30
    guidance: float | None = None
    width: int = 0
    height: int = 0


def _number(value: Any) -> float:
    return float(value) if value not in (None, "") else 0.0


class Workspace:
    def __init__(self, root: Path, queue: JobQueue | None = None) -> None:
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.state = self.root / runs.STATE_DIR
        # the latent / text-embedding cache of the runs stays under the root too
        self.queue = queue or JobQueue(self.state, env={"PERSONALIZE_CACHE": str(self.state / "cache")})

    # -- folders -----------------------------------------------------------------------------------------
    def path(self, relative: str | Path) -> Path:
        return inside_root(self.root, relative)

    def relative(self, path: Path) -> str:
        return str(path.resolve().relative_to(self.root))

    def run_folder(self, name: str) -> Path:
        if not name or not name.strip():
            raise UserError("give the run a name (its folder under runs/)")
        return self.path(Path("runs") / safe_name(name.strip(), "run"))

    def image_folders(self) -> list[str]:
        """Folders under the root that hold images (candidates for 'pick a folder'), the UI's own excluded."""
        found = []
        for folder in sorted(path for path in self.root.rglob("*") if path.is_dir()):
            parts = folder.relative_to(self.root).parts
            if any(part.startswith(".") for part in parts) or len(parts) > 4:
                continue
            if any(child.suffix.lower() in IMAGE_SUFFIXES for child in folder.iterdir() if child.is_file()):
                found.append(self.relative(folder))
        return found

    def model(self, name: str) -> str:
        """A base model by name or hub id as the CLI takes it; a local file or folder must be under the root."""
        name = (name or "").strip() or "tiny-sd15"
        local = name.startswith(("/", ".", "~")) or Path(name).suffix.lower() in (".safetensors", ".ckpt")
        return str(self.path(name)) if local or (self.root / name).exists() else name

    def run_names(self) -> list[str]:
        return [self.relative(run) for run in runs.list_runs(self.root)]

    # -- Train -------------------------------------------------------------------------------------------
    def upload(self, files: list[str], run: str) -> tuple[str, list[tuple[str, str]]]:
        """Store uploaded images in runs/NAME/images: (that folder, [(file, reason)] for each refused one)."""
        folder = self.run_folder(run) / "images"
        refused = []
        for name in files or []:
            source = Path(name)
            _stored, reason = accept_upload(source, source.name, folder)
            if reason is not None:
                refused.append((source.name, reason))
        folder.mkdir(parents=True, exist_ok=True)
        return self.relative(folder), refused

    def train_command(self, options: TrainOptions, resume: bool = False) -> tuple[list[str], Path]:
        images = self.path(options.images) if options.images else None
        if images is None or not images.is_dir():
            raise UserError("no photos yet: upload some or pick a folder under the root")
        output = self.run_folder(options.run)
        arguments = ["train", "--images", str(images), "--output", str(output), "--model", self.model(options.model)]
        for flag, value in (
            ("--preset", options.preset),
            ("--method", options.method),
            ("--token", options.token),
            ("--class-word", options.class_word),
        ):
            if value and str(value).strip():
                arguments += [flag, str(value).strip()]
        for flag, number in (
            ("--resolution", options.resolution),
            ("--steps", options.steps),
            ("--validate-every", options.sample_every),
        ):
            if int(_number(number)) > 0:
                arguments += [flag, str(int(_number(number)))]
        if resume:
            arguments.append("--resume")
        elif options.overwrite:
            arguments.append("--overwrite")
        return personalize_command(*arguments), output

    def start_training(self, options: TrainOptions, resume: bool = False) -> Job:
        command, output = self.train_command(options, resume)
        title = f"{'resume' if resume else 'train'} {self.relative(output)}"
        return self.queue.submit("train", title, command, output, self._log())

    def latest_job(self, kind: str, output: Path | None = None) -> Job | None:
        jobs = [job for job in self.queue.snapshot() if job.kind == kind]
        if output is not None:
            jobs = [job for job in jobs if Path(job.output) == output]
        return jobs[-1] if jobs else None

    # -- Generate ----------------------------------------------------------------------------------------
    def generate_command(self, options: GenerateOptions) -> tuple[list[str], Path]:
        if not options.prompt.strip():
            raise UserError("write a prompt")
        output = self.root / "generated" / time.strftime("%Y%m%d-%H%M%S")
        number = 1
        while output.exists():
            number += 1
            output = output.with_name(f"{output.name.split('_')[0]}_{number}")
        arguments = ["generate", "--model", self.model(options.model), "--prompt", options.prompt]
        arguments += ["--seed", str(int(options.seed)), "--num-images", str(int(options.num_images))]
        arguments += ["--steps", str(int(options.steps)), "--output", str(output)]
        if options.negative_prompt.strip():
            arguments += ["--negative-prompt", options.negative_prompt]
        if options.guidance is not None:
            arguments += ["--guidance", str(float(options.guidance))]
        for flag, value in (("--width", options.width), ("--height", options.height)):
            if int(_number(value)) > 0:
                arguments += [flag, str(int(_number(value)))]
        for adapter, weight in options.adapters:
            arguments += ["--adapter", f"{self.path(adapter)}:{float(weight):g}"]
        return personalize_command(*arguments), output

    def start_generation(self, options: GenerateOptions) -> Job:
        command, output = self.generate_command(options)
        return self.queue.submit("generate", f"generate {options.prompt[:40]!r}", command, output, self._log())

    # -- Batch -------------------------------------------------------------------------------------------
    def batch_files(self) -> list[str]:
        folder = self.root / "batch"
        files = [*folder.glob("*.yaml"), *folder.glob("*.yml"), *folder.glob("*.csv")] if folder.is_dir() else []
        return sorted(self.relative(path) for path in files)

    def save_job_file(self, name: str, text: str) -> str:
        clean = safe_name(name or "jobs.yaml", "jobs.yaml")
        if Path(clean).suffix.lower() not in (".yaml", ".yml", ".csv"):
            clean += ".yaml"
        path = self.path(Path("batch") / clean)
        self.check_job_file(text, path.parent, csv=path.suffix.lower() == ".csv")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return self.relative(path)

    def check_job_file(self, text: str, folder: Path, csv: bool = False) -> None:
        """Every folder a job file names (images, output, class_dir, config) must be under the root."""
        import csv as csv_module
        import io

        import yaml

        try:
            if csv:
                tree: Any = list(csv_module.DictReader(io.StringIO(text)))
            else:
                tree = yaml.safe_load(text)
        except (yaml.YAMLError, csv_module.Error) as error:
            raise UserError(f"the job file does not parse: {str(error).splitlines()[0]}") from None
        for key, value in _paths_in(tree):
            glob_free = str(value).split("*", 1)[0] or "."
            candidate = Path(glob_free).expanduser()
            inside_root(self.root, candidate if candidate.is_absolute() else folder / candidate)

    def start_batch(self, job_file: str, dry_run: bool = False) -> Job:
        if importlib_spec("personalize.batch") is None:
            raise UserError("this version of personalize has no batch training (personalize.batch)")
        path = self.path(job_file)
        if not path.is_file():
            raise UserError(f"no job file {job_file}; save one first")
        self.check_job_file(path.read_text(encoding="utf-8"), path.parent, csv=path.suffix.lower() == ".csv")
        output = path.with_suffix("")
        arguments = ["batch", str(path), "--output", str(output)] + (["--dry-run"] if dry_run else [])
        title = f"batch {'--dry-run ' if dry_run else ''}{self.relative(path)}"
        return self.queue.submit("batch", title, personalize_command(*arguments), output, self._log())

    # -- the queue ---------------------------------------------------------------------------------------
    def _log(self) -> Path:
        return self.state / "logs" / f"job-{len(self.queue.snapshot()) + 1:04d}.log"

    def job_rows(self) -> list[list[Any]]:
        rows = []
        for job in reversed(self.queue.snapshot()):
            seconds = (job.finished or time.time()) - job.started if job.started else 0.0
            note = job.error_line() if job.status in ("failed", "stopped") else ""
            rows.append([job.id, job.kind, job.title, job.status, job.device, f"{seconds:.0f} s", note])
        return rows


def _paths_in(tree: Any, key: str = "") -> list[tuple[str, Any]]:
    """(key, value) of every path-valued entry of a parsed job file."""
    path_keys = {"images", "output", "class_dir", "config", "data"}
    if isinstance(tree, dict):
        found = []
        for name, value in tree.items():
            if str(name).split(".")[-1] in path_keys and isinstance(value, str) and value:
                found.append((str(name), value))
            else:
                found += _paths_in(value, str(name))
        return found
    if isinstance(tree, list):
        return [pair for item in tree for pair in _paths_in(item, key)]
    return []


def importlib_spec(name: str) -> Any:
    from importlib.util import find_spec

    try:
        return find_spec(name)
    except (ImportError, ValueError):
        return None
