"""The whole batch: read, validate every job, skip what is done, run the rest, report.

`run_batch` is `personalize.batch.run` and what `personalize batch` calls; it returns one JobResult per
job in the order of the job file. Nothing trains until every job has been validated: an invalid job
stops the batch before it starts (or, with skip_invalid, is reported and left out).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from personalize.batch import jobfile, jobs, report
from personalize.errors import UserError

BACKENDS = ("local", "ray")


@dataclass
class JobResult:
    name: str
    status: str  # done, skipped (done earlier, unchanged), failed, invalid, pending (dry run)
    output: Path
    seconds: float = 0.0
    steps: int | None = None
    final_loss: float | None = None
    reason: str = ""  # why it failed / was skipped, one line
    phases: dict[str, float] = field(default_factory=dict)  # load, class_images, data, cache, setup, train, save
    resumed_from: int | None = None
    eval: dict[str, float] | None = None
    where: str = ""
    fingerprint: str = ""

    @property
    def ok(self) -> bool:
        return self.status in ("done", "skipped", "pending")


def _plan_memory(prepared: list[jobs.Job]) -> dict[str, str]:
    """Estimated peak memory per job from `personalize.plan` (plan(model, Settings) -> Estimate), when this
    version has the planner; a job it cannot size (a family it does not describe) shows '-'."""
    try:
        from personalize import plan as planner  # type: ignore[attr-defined]
    except ImportError:
        return {}
    if not (callable(getattr(planner, "plan", None)) and dataclasses.is_dataclass(getattr(planner, "Settings", None))):
        return {}
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    names = {item.name for item in dataclasses.fields(planner.Settings)}
    memory = {}
    for job in prepared:
        if job.problem:
            continue
        values = {**job.config, "resolution": job.config["data"].get("resolution")}
        values["method_options"] = tuple(sorted((values.get("method_options") or {}).items()))
        chosen = {key: value for key, value in values.items() if key in names and value is not None}
        try:
            estimate = planner.plan(job.config["model"], planner.Settings(**chosen), device=device)
        except Exception:  # the planner cannot size this job: its cell stays empty
            continue
        memory[job.name] = f"{estimate.peak / 2**30:.2f} GiB ({device})"
    return memory


def _will(job: jobs.Job, earlier: dict[str, Any] | None) -> str:
    if job.problem:
        return f"invalid: {job.problem}"
    if earlier is not None:
        return "skip (done, unchanged)" if earlier["status"] == "skipped" else "keep failed (--retry-failed reruns it)"
    from personalize.batch.runner import read_marker
    from personalize.trainers.common.checkpoints import latest_checkpoint

    marker = read_marker(job.output)
    checkpoint = latest_checkpoint(job.output / "checkpoints") if marker.get("fingerprint") == job.fingerprint else None
    return f"resume from {checkpoint.name}" if checkpoint is not None else "train"


def run_batch(
    jobs_or_file: Any,
    *,
    defaults: dict[str, Any] | None = None,
    output: str | Path | None = None,
    workers: int | None = None,
    backend: str = "local",
    address: str | None = None,
    num_gpus: float | None = None,
    num_cpus: float = 1.0,
    max_retries: int = 3,
    cache_dir: str | None = None,
    preset: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    retry_failed: bool = False,
    skip_invalid: bool = False,
    dry_run: bool = False,
    evaluate: bool = False,
    pipe: Any = None,
    progress: bool = True,
    echo: Callable[[str], None] = print,
) -> list[JobResult]:
    """Train every job of a job file (path) or list (folders / dicts of train keys, with `defaults`).

    workers: local worker processes (None: one per visible GPU, one on a CPU; 0: in this process, which
    `pipe=` needs). backend "ray": each job a Ray task (address, num_gpus / num_cpus per job, max_retries).
    """
    from personalize.batch.runner import earlier_outcome, result_of

    started = time.time()
    if backend not in BACKENDS:
        raise UserError(f"--backend must be local or ray, got '{backend}'")
    if isinstance(jobs_or_file, (str, Path)):
        spec = jobfile.read_job_file(jobs_or_file)
        default_root = Path("personalize-out") / Path(jobs_or_file).stem
    else:
        spec = jobfile.from_python(list(jobs_or_file), defaults)
        default_root = Path("personalize-out") / "batch"
    file_root = spec.defaults.get("output")
    root = Path(output or (spec.base_dir / str(file_root) if file_root else default_root)).expanduser().absolute()
    if evaluate:
        from personalize.batch.evaluation import available

        if not available():
            raise UserError("--eval needs `personalize eval`, which this version does not have; run without --eval")
    if pipe is not None and (backend != "local" or workers):
        raise UserError("pipe= runs the jobs in this process: use it with workers=0 and the local backend")
    prepared = jobs.prepare(spec, root, preset=preset, overrides=overrides, cache_dir=cache_dir)

    for job in prepared:
        for warning in job.warnings:
            echo(f"warning: {job.where}: job '{job.name}': {warning}")
    invalid = [job for job in prepared if job.problem]
    for job in invalid:
        echo(f"invalid: {job.where}: job '{job.name}': {job.problem}")
    if invalid and not (dry_run or skip_invalid):
        raise UserError(
            f"{len(invalid)} of {len(prepared)} jobs are invalid (listed above), nothing was trained; "
            "fix them, or pass --skip-invalid to run the others"
        )
    valid = [job for job in prepared if not job.problem]
    as_data = {
        job.name: {"name": job.name, "where": job.where, "config": job.config, "fingerprint": job.fingerprint}
        for job in valid
    }
    earlier = {job.name: earlier_outcome(as_data[job.name], retry_failed) for job in valid}

    if dry_run:
        states = {job.name: _will(job, earlier.get(job.name)) for job in prepared}
        header, rows = report.plan_rows(prepared, states, _plan_memory(prepared))
        echo(report.text_table(header, rows))
        return [
            JobResult(
                job.name,
                "invalid" if job.problem else "pending",
                job.output,
                reason=job.problem or states[job.name],
                where=job.where,
                fingerprint=job.fingerprint,
            )
            for job in prepared
        ]

    results: dict[str, dict[str, Any]] = {}
    for job in invalid:
        results[job.name] = {
            "name": job.name,
            "where": job.where,
            "status": "invalid",
            "reason": job.problem,
            "output": str(job.output) if job.config else "",
        }
    for name, outcome in earlier.items():
        if outcome is not None:
            results[name] = outcome
            echo(report.finished_line(outcome))
    to_run = [as_data[job.name] for job in valid if earlier[job.name] is None]
    order = [job.name for job in prepared]

    def ordered() -> list[dict[str, Any]]:
        return [results[name] for name in order if name in results]

    from tqdm.auto import tqdm

    bar = tqdm(total=len(to_run), desc="batch", unit="job", disable=not progress or not to_run, file=sys.stderr)

    def on_start(job: dict[str, Any], worker: int | None) -> None:
        bar.set_postfix_str(f"running {job['name']}")

    def on_result(result: dict[str, Any]) -> None:
        results[result["name"]] = result
        bar.write(report.finished_line(result), file=sys.stdout)
        bar.update(1)
        report.write_reports(root, ordered(), spec.source, started)

    try:
        if to_run and backend == "ray":
            from personalize.batch.ray_backend import run_ray

            run_ray(
                to_run,
                on_start,
                on_result,
                address=address,
                num_gpus=num_gpus,
                num_cpus=num_cpus,
                max_retries=max_retries,
                evaluate=evaluate,
            )
        elif to_run:
            from personalize.batch import local

            count = local.default_workers() if workers is None else workers
            if count == 0:
                local.run_in_process(to_run, on_start, on_result, evaluate, pipe)
            else:
                quiet = "--verbose" not in sys.argv and "--debug" not in sys.argv
                local.run_workers(to_run, count, on_start, on_result, evaluate, quiet)
    except KeyboardInterrupt:
        bar.close()
        echo("interrupted: rerun the same batch to resume the unfinished jobs from their checkpoints")
        raise
    finally:
        bar.close()
        for job in to_run:  # interrupted: the jobs that did not finish are reported as pending
            results.setdefault(job["name"], result_of(job, "pending", reason="not finished; rerun to resume it"))
        json_path, md_path = report.write_reports(root, ordered(), spec.source, started)
    failed = [result for result in ordered() if result["status"] in ("failed", "invalid")]
    echo(f"{len(ordered()) - len(failed)} of {len(ordered())} jobs ok; wrote {md_path} and {json_path}")
    return [_as_result(result) for result in ordered()]


def _as_result(data: dict[str, Any]) -> JobResult:
    fields = {key: value for key, value in data.items() if key in JobResult.__dataclass_fields__}
    fields["output"] = Path(fields.get("output") or "")
    return JobResult(**fields)
