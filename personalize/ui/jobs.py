"""The UI's background worker: a queue of `personalize` commands, one running job per device.

Each job is a child process running the same command line a user would type (`personalize train ...`,
`personalize generate ...`, `personalize batch ...`), so the UI holds no training logic, a crash cannot take
the page down, and the page stays responsive while torch works. Stopping a job sends the child SIGINT:
the training loop finishes the step in progress, saves the adapter and a checkpoint and exits 130
(trainers/common/loop.py), so "resume" is the same command with `--resume`.

The queue lives in the server process, not in the browser: closing the page changes nothing, and
reopening it shows every job. The job list is also written to ROOT/.personalize-ui/jobs.json, so a
restarted UI still lists past jobs (a job that was running when the UI stopped is shown as "lost").
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

QUEUED, RUNNING, DONE, FAILED, STOPPED, CANCELLED, LOST = (
    "queued",
    "running",
    "done",
    "failed",
    "stopped",
    "cancelled",
    "lost",
)
FINISHED = {DONE, FAILED, STOPPED, CANCELLED, LOST}
INTERRUPTED_EXIT = 130  # the CLI's exit code after Ctrl-C / SIGINT (adapter and checkpoint saved)


@dataclass
class Job:
    id: int
    kind: str  # train | generate | batch
    title: str
    command: list[str]  # the full argv of the child process
    output: str  # the folder the job writes (under the root)
    log: str  # the child's stdout + stderr
    status: str = QUEUED
    device: str = ""
    returncode: int | None = None
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None

    def error_line(self) -> str:
        """The child's last `error: ...` line (the CLI's one-line user error), else its last line."""
        try:
            lines = [line.strip() for line in Path(self.log).read_text(errors="replace").splitlines() if line.strip()]
        except OSError:
            return ""
        errors = [line for line in lines if line.startswith("error:")]
        return (errors or lines or [""])[-1][:300]


def personalize_command(*arguments: str) -> list[str]:
    """The argv that runs `personalize ARGUMENTS` with this interpreter (the installed CLI, no PATH lookup)."""
    return [sys.executable, "-m", "personalize", *arguments]


def visible_devices() -> list[str]:
    """One worker per CUDA device, else one CPU worker (two CPU jobs would only slow each other down)."""
    try:
        import torch

        count = torch.cuda.device_count()
    except Exception:  # no torch build with CUDA: the CPU worker
        count = 0
    return [f"cuda:{index}" for index in range(count)] or ["cpu"]


class JobQueue:
    """FIFO jobs; each device's worker thread runs one child process at a time."""

    def __init__(
        self,
        state_dir: Path,
        devices: list[str] | None = None,
        env: dict[str, str] | None = None,
        on_change: Callable[[], None] | None = None,
    ):
        self.state_dir = state_dir
        self.env = env or {}
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.devices = devices or visible_devices()
        self.on_change = on_change
        self.jobs: list[Job] = self._load()
        self.processes: dict[int, subprocess.Popen[bytes]] = {}
        self.lock = threading.Condition()
        self.closed = False
        self.workers = [
            threading.Thread(target=self._work, args=(device,), name=f"personalize-ui-{device}", daemon=True)
            for device in self.devices
        ]
        for worker in self.workers:
            worker.start()

    # -- the page's side ---------------------------------------------------------------------------------
    def submit(self, kind: str, title: str, command: list[str], output: Path, log: Path) -> Job:
        with self.lock:
            job = Job(len(self.jobs) + 1, kind, title, command, str(output), str(log))
            self.jobs.append(job)
            self._save()
            self.lock.notify_all()
        return job

    def get(self, job_id: int) -> Job | None:
        with self.lock:
            return next((job for job in self.jobs if job.id == job_id), None)

    def snapshot(self) -> list[Job]:
        with self.lock:
            return [Job(**asdict(job)) for job in self.jobs]

    def stop(self, job_id: int) -> str:
        """Cancel a queued job, or ask a running one to stop after its current step (SIGINT)."""
        with self.lock:
            job = next((job for job in self.jobs if job.id == job_id), None)
            if job is None:
                return f"no job {job_id}"
            if job.status == QUEUED:
                job.status, job.finished = CANCELLED, time.time()
                self._save()
                return f"job {job_id} cancelled"
            process = self.processes.get(job_id)
            if job.status != RUNNING or process is None:
                return f"job {job_id} is {job.status}"
            process.send_signal(signal.SIGINT)
            return f"job {job_id}: stopping after the current step (the adapter and a checkpoint are saved)"

    def wait(self, job_id: int, timeout: float) -> Job:
        """Block until the job has finished (for scripts and tests); returns its final state."""
        deadline = time.monotonic() + timeout
        with self.lock:
            while True:
                job = next(job for job in self.jobs if job.id == job_id)
                if job.status in FINISHED:
                    return Job(**asdict(job))
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"job {job_id} still {job.status} after {timeout:.0f} s")
                self.lock.wait(min(left, 1.0))

    def close(self) -> None:
        """Stop taking jobs; running children keep going to their end (they own their outputs)."""
        with self.lock:
            self.closed = True
            self.lock.notify_all()

    # -- the worker's side -------------------------------------------------------------------------------
    def _next(self) -> Job | None:
        with self.lock:
            while not self.closed:
                job = next((job for job in self.jobs if job.status == QUEUED), None)
                if job is not None:
                    job.status = RUNNING
                    return job
                self.lock.wait()
            return None

    def _work(self, device: str) -> None:
        while (job := self._next()) is not None:
            self._run(job, device)

    def _run(self, job: Job, device: str) -> None:
        env = dict(os.environ, **self.env, TQDM_MININTERVAL="0")  # a progress line per step: the live loss plot reads it
        if device.startswith("cuda:"):
            env["CUDA_VISIBLE_DEVICES"] = device.split(":", 1)[1]
        Path(job.log).parent.mkdir(parents=True, exist_ok=True)
        with open(job.log, "ab") as log:
            try:
                process = subprocess.Popen(job.command, stdout=log, stderr=subprocess.STDOUT, env=env)
            except OSError as error:
                log.write(f"error: could not start {job.command[0]}: {error}\n".encode())
                self._finish(job, FAILED, None)
                return
            with self.lock:
                job.device, job.started = device, time.time()
                self.processes[job.id] = process
                self._save()
            code = process.wait()
        status = DONE if code == 0 else STOPPED if code == INTERRUPTED_EXIT else FAILED
        self._finish(job, status, code)

    def _finish(self, job: Job, status: str, code: int | None) -> None:
        with self.lock:
            job.status, job.returncode, job.finished = status, code, time.time()
            self.processes.pop(job.id, None)
            self._save()
            self.lock.notify_all()
        if self.on_change is not None:
            self.on_change()

    # -- persistence -------------------------------------------------------------------------------------
    @property
    def state_file(self) -> Path:
        return self.state_dir / "jobs.json"

    def _save(self) -> None:
        partial = self.state_file.with_suffix(".json.partial")
        partial.write_text(json.dumps([asdict(job) for job in self.jobs], indent=1))
        partial.replace(self.state_file)

    def _load(self) -> list[Job]:
        try:
            rows: list[dict[str, Any]] = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return []
        jobs = [Job(**row) for row in rows]
        for job in jobs:  # this process never started them, or its predecessor died while they ran
            if job.status in (QUEUED, RUNNING):
                job.status = LOST if job.status == RUNNING else CANCELLED
        return jobs
