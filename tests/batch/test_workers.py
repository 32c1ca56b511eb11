"""Jobs in other processes: local worker processes and a real local Ray cluster, each with a worker killed mid-job."""

import json
import os
import signal
import threading
import time

import pytest
import torch
from safetensors.torch import load_file

from personalize.batch import run

from .conftest import TINY_DEFAULTS, make_subject

ADAPTER = "pytorch_lora_weights.safetensors"
# long enough (12 steps, a checkpoint every 2) that a worker can be killed between a checkpoint and the end
LONGER = {**TINY_DEFAULTS, "steps": 12, "checkpoint_every": 2}


def quiet(line):
    pass


def three_subjects(photos):
    make_subject(photos / "qrt_cat", 2, start=1)
    return [str(photos / name) for name in ("sks_cat", "zwx_dog", "qrt_cat")]


def batch(jobs, tmp_path, root, **options):
    settings = dict(defaults=LONGER, output=tmp_path / root, cache_dir=str(tmp_path / "cache"), echo=quiet)
    return run(jobs, progress=False, **{**settings, **options})


class Killer(threading.Thread):
    """Kills the process training the first job that has written a checkpoint (SIGKILL: no clean-up)."""

    def __init__(self, root):
        super().__init__(daemon=True)
        self.root, self.killed, self.stop = root, None, False

    def run(self):
        while not self.stop and self.killed is None:
            for job in sorted(self.root.glob("*/checkpoints/step-000002")):
                folder = job.parents[1]
                marker = json.loads((folder / "batch-job.json").read_text())
                if marker.get("status") == "running" and not (folder / "metrics.json").exists():
                    os.kill(marker["pid"], signal.SIGKILL)
                    self.killed = folder.name
                    return
            time.sleep(0.02)


def same_adapters(results, expected):
    for result in results:
        mine, theirs = load_file(str(result.output / ADAPTER)), load_file(str(expected[result.name] / ADAPTER))
        assert mine.keys() == theirs.keys(), result.name
        assert all(torch.equal(mine[key], theirs[key]) for key in theirs), result.name


@pytest.mark.slow
def test_local_workers_match_in_process_and_survive_a_killed_worker(photos, tmp_path):
    jobs = three_subjects(photos)
    reference = {result.name: result.output for result in batch(jobs, tmp_path, "inline", workers=0)}
    killer = Killer(tmp_path / "workers")
    killer.start()
    results = batch(jobs, tmp_path, "workers", workers=2)
    killer.stop = True
    assert killer.killed is not None, "no worker was killed mid-job"
    by_name = {result.name: result for result in results}
    assert by_name[killer.killed].status == "failed" and "worker process died" in by_name[killer.killed].reason
    assert all(result.status == "done" for name, result in by_name.items() if name != killer.killed)
    # a rerun resumes the killed job from its checkpoint and skips the others
    again = {result.name: result for result in batch(jobs, tmp_path, "workers", workers=2)}
    assert again[killer.killed].status == "done" and again[killer.killed].resumed_from >= 2
    assert sorted(result.status for result in again.values()) == ["done", "skipped", "skipped"]
    same_adapters(again.values(), reference)


@pytest.mark.slow
def test_ray_backend_retries_a_killed_worker_and_matches_the_local_backend(photos, tmp_path):
    ray = pytest.importorskip("ray")
    jobs = three_subjects(photos)
    reference = {result.name: result.output for result in batch(jobs, tmp_path, "local", workers=0)}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        killer = Killer(tmp_path / "ray")
        killer.start()
        results = batch(jobs, tmp_path, "ray", backend="ray")
        killer.stop = True
    finally:
        ray.shutdown()
    assert killer.killed is not None, "no Ray worker was killed mid-job"
    by_name = {result.name: result for result in results}
    assert all(result.status == "done" for result in results), [(r.name, r.status, r.reason) for r in results]
    assert by_name[killer.killed].resumed_from >= 2  # Ray retried the task; it resumed from the checkpoint
    same_adapters(results, reference)
