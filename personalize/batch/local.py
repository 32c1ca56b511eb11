"""The local backend: jobs in this process (`workers=0`) or in N worker processes, each pinned to a device.

A worker is a spawned process that sees one GPU (CUDA_VISIBLE_DEVICES, set before torch starts in it)
or, on a CPU-only machine, its share of the cores. It keeps its loaded base across jobs (shared.BaseCache)
and pulls jobs from one queue, ordered so that jobs on the same base follow each other. A worker that
dies (killed, out of host memory) fails its current job with that reason; a new worker takes its place.
"""

from __future__ import annotations

import os
import queue
from collections.abc import Callable
from typing import Any

Result = dict[str, Any]


def visible_gpus() -> list[str]:
    """The CUDA devices this process may use, as CUDA_VISIBLE_DEVICES entries."""
    import torch

    if not torch.cuda.is_available():
        return []
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None and listed.strip():
        return [item.strip() for item in listed.split(",") if item.strip()]
    return [str(index) for index in range(torch.cuda.device_count())]


def default_workers() -> int:
    return max(1, len(visible_gpus()))


def run_in_process(jobs: list[Result], on_start: Callable, on_result: Callable, evaluate: bool, pipe: Any) -> None:
    from personalize.batch.runner import run_job
    from personalize.batch.shared import BaseCache

    bases = BaseCache(fixed=pipe)
    pending, model = list(jobs), None
    while pending:
        job = _pick(pending, model)
        model = job["config"]["model"]
        on_start(job, 0)
        on_result(run_job(job, bases, evaluate))


def _worker(device: str | None, threads: int, quiet: bool, tasks: Any, results: Any) -> None:
    """A worker process's whole life: pin, then run the jobs sent to it until the None that ends it."""
    if device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = device
    if quiet:
        from personalize.cli import quiet_libraries

        quiet_libraries()
    import torch

    torch.set_num_threads(threads)
    from personalize.batch.runner import run_job
    from personalize.batch.shared import BaseCache

    bases = BaseCache()
    try:
        while True:
            job, evaluate = tasks.get()
            if job is None:
                return
            results.put(run_job(job, bases, evaluate))
    except KeyboardInterrupt:  # Ctrl-C reached the whole process group: the job saved a checkpoint, stop quietly
        return


def _pick(pending: list[Result], model: str | None) -> Result:
    """The next job, preferring one on the base the worker has loaded."""
    for position, job in enumerate(pending):
        if job["config"]["model"] == model:
            return pending.pop(position)
    return pending.pop(0)


class _Worker:
    def __init__(self, context: Any, device: str | None, threads: int, quiet: bool, results: Any) -> None:
        self.tasks = context.Queue()
        self.process = context.Process(target=_worker, args=(device, threads, quiet, self.tasks, results), daemon=True)
        self.process.start()
        self.job: Result | None = None
        self.model: str | None = None


def run_workers(
    jobs: list[Result], workers: int, on_start: Callable, on_result: Callable, evaluate: bool, quiet: bool
) -> None:
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # a fresh interpreter: no forked CUDA or thread state
    gpus = visible_gpus()
    threads = max(1, (os.cpu_count() or 1) // (len(gpus) or workers))
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():  # the user's cap wins (busy machines: see the Makefile)
        threads = min(threads, max(1, int(os.environ["OMP_NUM_THREADS"])))
    results = context.Queue()
    pending = list(jobs)
    started = 0

    def new_worker() -> _Worker:
        nonlocal started
        worker = _Worker(context, gpus[started % len(gpus)] if gpus else None, threads, quiet, results)
        started += 1
        return worker

    def assign(slot: int) -> None:
        worker = pool[slot]
        if not pending:
            worker.job = None
            worker.tasks.put((None, False))
            return
        worker.job = _pick(pending, worker.model)
        worker.model = worker.job["config"]["model"]
        worker.tasks.put((worker.job, evaluate))
        on_start(worker.job, slot)

    pool = [new_worker() for _ in range(min(workers, len(jobs)))]
    for slot in range(len(pool)):
        assign(slot)
    remaining = len(jobs)
    try:
        _collect(pool, results, remaining, on_result, assign, new_worker)
    except KeyboardInterrupt:  # the workers got the Ctrl-C too: let them save their step's checkpoint first
        for worker in pool:
            worker.process.join(timeout=120)
        raise
    for worker in pool:
        worker.process.join(timeout=60)


def _collect(
    pool: list[_Worker], results: Any, remaining: int, on_result: Callable, assign: Callable, new_worker: Callable
) -> None:
    """Hand each result on and give its worker the next job, until every job has a result."""
    from personalize.batch.runner import result_of

    while remaining:
        try:
            result = results.get(timeout=1.0)
        except queue.Empty:
            for slot, worker in enumerate(pool):
                if worker.job is None or worker.process.is_alive():
                    continue
                # died in the middle of a job (killed, out of host memory): that job fails, the rest go on
                reason = f"worker process died (exit code {worker.process.exitcode}); rerun the batch to resume it"
                on_result(result_of(worker.job, "failed", reason=reason))
                remaining -= 1
                pool[slot] = new_worker()
                assign(slot)
            continue
        slot = next(slot for slot, worker in enumerate(pool) if worker.job and worker.job["name"] == result["name"])
        on_result(result)
        remaining -= 1
        assign(slot)
