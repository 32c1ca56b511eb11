"""personalize.batch: many subjects from one job file, on this machine or a Ray cluster.

    from personalize.batch import run
    results = run("jobs.yaml")                                   # or a list of jobs:
    results = run(["photos/cat", {"images": "photos/dog", "rank": 8}], defaults={"model": "tiny-sd15"})
    [(r.name, r.status, r.final_loss, r.output) for r in results]

Pieces: jobfile.py (reading YAML/CSV), jobs.py (resolving and validating), shared.py (the base, class
images), runner.py (one job: skip, resume, isolate), local.py and ray_backend.py (where jobs run),
report.py (table, batch.json, batch.md), evaluation.py (figures of `personalize eval` when present),
driver.py (the whole batch), cli.py (`personalize batch`). `personalize.trainers.train(pipe=...)` stays
for custom loops.
"""

from typing import Any


def run(jobs: Any, **options: Any) -> Any:
    """See personalize.batch.driver.run_batch (imported lazily: `import personalize.batch` stays cheap)."""
    from personalize.batch.driver import run_batch

    return run_batch(jobs, **options)


__all__ = ["run"]
