"""`personalize batch JOBS.yaml|JOBS.csv`: train many subjects from one job file (see personalize.batch)."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "batch",
        help="train many subjects from one job file (YAML or CSV), locally or on a Ray cluster",
        description="Each job is an images folder plus overrides of the file's defaults (any `personalize train` "
        "key or preset); `images: photos/*` makes one job per folder. Every job is validated before anything "
        "trains; finished jobs are skipped on a rerun, interrupted ones resume from their checkpoint.",
    )
    add = parser.add_argument
    add("jobs", metavar="JOBS", help="job file: .yaml/.yml (defaults + a jobs: list) or .csv (a column per key)")
    add("--dry-run", action="store_true", help="validate every job and print the job table; train nothing")
    add(
        "--output",
        metavar="DIR",
        help="batch folder: one folder per job, batch.json, batch.md "
        "(default: the file's output key, else ./personalize-out/<job file name>)",
    )
    add(
        "--workers",
        type=int,
        metavar="N",
        help="local worker processes (default: one per visible GPU, one on a CPU; 0: in this process)",
    )
    add("--backend", default="local", help="local (default) or ray")
    add("--address", metavar="ADDR", help="ray: the cluster to connect to (default: $RAY_ADDRESS, else a local one)")
    add("--gpus-per-job", type=float, metavar="G", help="ray: GPUs per job (default: 1 when the cluster has GPUs)")
    add("--cpus-per-job", type=float, default=1.0, metavar="C", help="ray: CPUs per job (default 1)")
    add("--max-retries", type=int, default=3, metavar="N", help="ray: retries of a job whose worker died (default 3)")
    add(
        "--cache-dir",
        metavar="DIR",
        help="shared cache of latents, text embeddings and class images "
        "(default: $PERSONALIZE_CACHE, else ~/.cache/personalize; on a cluster: a shared path)",
    )
    add("--retry-failed", action="store_true", help="run again the jobs that failed in an earlier run")
    add("--skip-invalid", action="store_true", help="run the valid jobs even when others are invalid")
    add("--eval", action="store_true", help="evaluate each finished job with `personalize eval` (when installed)")
    add("--preset", help="preset of the jobs that name none (below the file's defaults)")
    add("--set", action="append", default=[], metavar="KEY=VALUE", help="override a key in every job")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from personalize.batch import run as run_batch

    results = run_batch(
        args.jobs,
        output=args.output,
        workers=args.workers,
        backend=args.backend,
        address=args.address,
        num_gpus=args.gpus_per_job,
        num_cpus=args.cpus_per_job,
        max_retries=args.max_retries,
        cache_dir=args.cache_dir,
        preset=args.preset,
        overrides=args.set,
        retry_failed=args.retry_failed,
        skip_invalid=args.skip_invalid,
        dry_run=args.dry_run,
        evaluate=args.eval,
    )
    if args.dry_run:
        return 2 if any(result.status == "invalid" for result in results) else 0
    return 1 if any(not result.ok for result in results) else 0
