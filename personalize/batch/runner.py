"""One job, run by any backend: skip / resume decision, the shared base, class images, train, the outcome.

Each job folder holds `batch-job.json` (the job's fingerprint, status, reason, worker pid and host): a
rerun skips a job marked done with the same fingerprint, resumes a job that stopped with a checkpoint
(an interrupted batch, a killed worker), and starts over when the settings or images changed. Whatever
the recipe prints goes to the job's `train.log`; a failure becomes one line in the result, the
traceback goes to that log, and the worker drops its base (the failure may have left adapters in it).
"""

from __future__ import annotations

import json
import os
import socket
import time
import traceback
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from typing import Any

from personalize.errors import UserError

MARKER = "batch-job.json"
LOG = "train.log"


def read_marker(output: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(output) / MARKER).read_text())
    except (OSError, ValueError):
        return {}


def write_marker(output: Path, **fields: Any) -> None:
    output.mkdir(parents=True, exist_ok=True)
    partial = output / f"{MARKER}.{os.getpid()}.partial"
    partial.write_text(json.dumps(fields, indent=1))
    partial.replace(output / MARKER)


def finished_metrics(output: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(output) / "metrics.json").read_text())
    except (OSError, ValueError):
        return {}


def result_of(job: dict[str, Any], status: str, **fields: Any) -> dict[str, Any]:
    """The per-job result every backend returns (plain data: it crosses process and host boundaries)."""
    base = {
        "name": job["name"],
        "where": job.get("where", ""),
        "status": status,
        "output": job["config"]["output"],
        "fingerprint": job["fingerprint"],
        "seconds": 0.0,
        "steps": None,
        "final_loss": None,
        "reason": "",
        "phases": {},
        "resumed_from": None,
        "eval": None,
    }
    base.update(fields)
    return base


def earlier_outcome(job: dict[str, Any], retry_failed: bool) -> dict[str, Any] | None:
    """The result of an earlier run that stands (done, or failed without --retry-failed), else None."""
    output = Path(job["config"]["output"])
    marker = read_marker(output)
    if marker.get("fingerprint") != job["fingerprint"]:
        return None
    if marker.get("status") == "done":
        metrics = finished_metrics(output)
        if not metrics:
            return None  # its files are gone: run it again
        from personalize.batch.evaluation import figures

        return result_of(
            job,
            "skipped",
            steps=metrics.get("steps"),
            final_loss=metrics.get("final_loss"),
            seconds=marker.get("seconds", 0.0),
            reason="done earlier with the same settings and images",
            phases=metrics.get("phases", {}),
            eval=figures(output),
        )
    if marker.get("status") == "failed" and not retry_failed:
        return result_of(job, "failed", reason=f"{marker.get('reason', 'failed')} (earlier run; --retry-failed)")
    return None


def describe_failure(error: BaseException) -> str:
    if isinstance(error, UserError):
        return str(error).strip().splitlines()[0]
    if type(error).__name__ == "OutOfMemoryError":
        return "not enough memory; try batch_size 1, gradient_checkpointing, mixed_precision bf16 or quantize nf4"
    lines = str(error).strip().splitlines()
    return f"unexpected failure ({type(error).__name__}: {lines[0][:200] if lines else ''})"


def run_job(job: dict[str, Any], bases: Any, evaluate: bool = False) -> dict[str, Any]:
    """Train one job on a base from `bases` (a shared.BaseCache); never raises for a job's own failure."""
    from personalize.batch.evaluation import figures, run_evaluation
    from personalize.batch.jobs import train_config
    from personalize.batch.shared import ensure_shared_class_images
    from personalize.trainers import train
    from personalize.trainers.common.checkpoints import latest_checkpoint
    from personalize.trainers.common.frozen_base import with_model_resolution

    output = Path(job["config"]["output"])
    marker = read_marker(output)
    checkpoint = latest_checkpoint(output / "checkpoints") if marker.get("fingerprint") == job["fingerprint"] else None
    resumed_from = int(checkpoint.name.split("-")[1]) if checkpoint is not None else None
    identity = {"fingerprint": job["fingerprint"], "pid": os.getpid(), "host": socket.gethostname()}
    write_marker(output, **identity, status="running", started=time.time())
    started = time.perf_counter()
    phases: dict[str, float] = {}
    # The batch owns a folder with a marker: a changed job replaces the run in it (a folder without one is
    # left to train's own check, which refuses to replace a finished run).
    owned = bool(marker) and checkpoint is None
    config = train_config({**job["config"], "resume": checkpoint is not None, "overwrite": owned})
    with (output / LOG).open("a") as log, redirect_stdout(log), redirect_stderr(log):
        print(f"--- personalize batch: job {job['name']} (pid {os.getpid()}) at {time.ctime()}", flush=True)
        try:
            pipe, phases["load"] = bases.get(config)
            sized = with_model_resolution(config, pipe, lambda note: None)  # the size train will use
            phases["class_images"] = ensure_shared_class_images(pipe, sized)
            result = train(config, pipe=pipe)
            for phase, seconds in result.metrics.get("phases", {}).items():
                phases[phase] = phases.get(phase, 0.0) + seconds
            if evaluate:
                started_eval = time.perf_counter()
                run_evaluation(pipe, output)
                phases["eval"] = time.perf_counter() - started_eval
        except Exception as error:  # isolation: this job fails, the batch goes on
            traceback.print_exc(file=log)
            reason = describe_failure(error)
            bases.discard(config)
            seconds = time.perf_counter() - started
            write_marker(output, **identity, status="failed", reason=reason, seconds=seconds)
            return result_of(job, "failed", seconds=seconds, reason=reason, phases=phases, resumed_from=resumed_from)
    seconds = time.perf_counter() - started
    write_marker(output, **identity, status="done", seconds=seconds, finished=time.time())
    return result_of(
        job,
        "done",
        seconds=seconds,
        steps=result.metrics.get("steps"),
        final_loss=result.metrics.get("final_loss"),
        phases=phases,
        resumed_from=resumed_from,
        eval=figures(output),
    )
