"""The Ray backend: each job a Ray task on an existing cluster (or a local one), retried when its worker dies.

`--backend ray [--address ADDR]` connects with `ray.init(address=...)` (no address: $RAY_ADDRESS, else a
local cluster for this run; an already initialized Ray is used as it is). Every job is a task with
`num_gpus` / `num_cpus` per job; Ray reuses its worker processes, and each keeps the base it loaded
(a module-level shared.BaseCache) for the next task on the same base. A task whose worker dies (killed
node, lost process) is retried by Ray up to `max_retries` times, and the retry resumes from the job's
last checkpoint (runner.run_job reads it from the job folder). So outputs and caches must be on a path
every node sees (a shared filesystem): `--output` and `--cache-dir`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from personalize.errors import UserError

INSTALL = "--backend ray needs Ray: pip install 'personalize[ray]'"
_BASES: Any = None  # per Ray worker process: the bases it has loaded


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise UserError(INSTALL) from None
    return ray


def _job_task(job: dict[str, Any], evaluate: bool) -> dict[str, Any]:
    """Runs inside a Ray worker."""
    global _BASES
    from personalize.batch.runner import run_job
    from personalize.batch.shared import BaseCache

    if _BASES is None:
        _BASES = BaseCache()
    return run_job(job, _BASES, evaluate)


def run_ray(
    jobs: list[dict[str, Any]],
    on_start: Callable,
    on_result: Callable,
    *,
    address: str | None = None,
    num_gpus: float | None = None,
    num_cpus: float = 1.0,
    max_retries: int = 3,
    evaluate: bool = False,
) -> None:
    ray = _ray()
    started_here = not ray.is_initialized()
    if started_here:
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        except (ConnectionError, ValueError, RuntimeError) as error:
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise UserError(f"could not connect to Ray at {address or 'a new local cluster'}: {first[:200]}") from None
    if num_gpus is None:  # one GPU per job when the cluster has GPUs, else CPU jobs
        num_gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
    task = ray.remote(_job_task).options(
        num_gpus=num_gpus, num_cpus=num_cpus, max_retries=max_retries, retry_exceptions=False
    )
    try:
        refs = {}
        for job in jobs:
            refs[task.remote(job, evaluate)] = job
            on_start(job, None)
        while refs:
            done, _ = ray.wait(list(refs), num_returns=1)
            for ref in done:
                job = refs.pop(ref)
                try:
                    on_result(ray.get(ref))
                except ray.exceptions.RayError as error:  # the worker died more than max_retries times
                    from personalize.batch.runner import result_of

                    first = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
                    on_result(result_of(job, "failed", reason=f"Ray task failed after {max_retries} retries: {first}"))
    finally:
        if started_here:
            ray.shutdown()
