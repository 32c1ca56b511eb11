"""The UI's background queue: one job per device at a time, FIFO, stop = SIGINT, state survives a restart."""

import json
import sys

from personalize.ui.jobs import CANCELLED, DONE, FAILED, LOST, STOPPED, JobQueue, personalize_command
from personalize.ui.workspace import TrainOptions, Workspace

# A child that records when it ran; on SIGINT it exits 130, as `personalize train` does after saving.
CHILD = """
import signal, sys, time
signal.signal(signal.SIGINT, lambda *a: sys.exit(130))
start = time.time()
time.sleep(float(sys.argv[2]))
open(sys.argv[1], "w").write(f"{start} {time.time()}")
"""


def _job(queue, tmp_path, name, seconds):
    record = tmp_path / f"{name}.txt"
    command = [sys.executable, "-c", CHILD, str(record), str(seconds)]
    return queue.submit("test", name, command, tmp_path, tmp_path / f"{name}.log"), record


def test_two_jobs_on_one_device_run_one_after_the_other(tmp_path):
    queue = JobQueue(tmp_path / "state", devices=["cpu"])
    first, first_record = _job(queue, tmp_path, "first", 1.0)
    second, second_record = _job(queue, tmp_path, "second", 0.2)
    assert queue.wait(second.id, 60).status == DONE
    assert queue.get(first.id).status == DONE
    first_start, first_end = map(float, first_record.read_text().split())
    second_start, _ = map(float, second_record.read_text().split())
    assert second_start >= first_end  # the second started only after the first had finished
    assert [job.device for job in queue.snapshot()] == ["cpu", "cpu"]


def test_two_devices_run_two_jobs_at_once(tmp_path):
    queue = JobQueue(tmp_path / "state", devices=["cpu", "cpu-2"])
    first, first_record = _job(queue, tmp_path, "first", 2.0)
    second, second_record = _job(queue, tmp_path, "second", 2.0)
    queue.wait(first.id, 60), queue.wait(second.id, 60)
    (a_start, a_end), (b_start, b_end) = (map(float, r.read_text().split()) for r in (first_record, second_record))
    assert b_start < a_end and a_start < b_end  # overlapped


def test_stop_sends_sigint_and_cancel_drops_a_queued_job(tmp_path):
    queue = JobQueue(tmp_path / "state", devices=["cpu"])
    running, _ = _job(queue, tmp_path, "long", 60)
    waiting, record = _job(queue, tmp_path, "waiting", 0.1)
    assert "cancelled" in queue.stop(waiting.id)
    import time

    while queue.get(running.id).status != "running" or not queue.processes:
        time.sleep(0.05)
    time.sleep(0.5)  # let the child install its handler
    assert "stopping" in queue.stop(running.id)
    finished = queue.wait(running.id, 30)
    assert (finished.status, finished.returncode) == (STOPPED, 130)
    assert queue.get(waiting.id).status == CANCELLED and not record.exists()


def test_a_failing_job_keeps_its_error_line_and_the_queue_goes_on(tmp_path):
    queue = JobQueue(tmp_path / "state", devices=["cpu"])
    bad = queue.submit(
        "train",
        "bad",
        personalize_command("train", "--images", str(tmp_path / "missing")),
        tmp_path,
        tmp_path / "b.log",
    )
    good, _ = _job(queue, tmp_path, "good", 0.1)
    failed = queue.wait(bad.id, 120)
    assert failed.status == FAILED and failed.returncode == 2
    assert failed.error_line().startswith("error: ") and "missing" in failed.error_line()
    assert queue.wait(good.id, 60).status == DONE


def test_restarted_queue_lists_past_jobs(tmp_path):
    state = tmp_path / "state"
    queue = JobQueue(state, devices=["cpu"])
    job, _ = _job(queue, tmp_path, "one", 0.1)
    queue.wait(job.id, 60)
    queue.close()
    rows = json.loads((state / "jobs.json").read_text())
    rows.append({**rows[0], "id": 2, "status": "running"})  # a job that was running when the UI died
    (state / "jobs.json").write_text(json.dumps(rows))
    again = JobQueue(state, devices=["cpu"])
    assert [(job.id, job.status) for job in again.snapshot()] == [(1, DONE), (2, LOST)]


def test_train_command_is_the_cli_and_stays_under_the_root(tmp_path):
    workspace = Workspace(tmp_path / "root", queue=JobQueue(tmp_path / "state", devices=["cpu"]))
    (workspace.root / "photos").mkdir()
    options = TrainOptions(images="photos", run="../../cat", steps=3, sample_every=0, method="lora")
    command, output = workspace.train_command(options)
    assert command[1:4] == ["-m", "personalize", "train"]
    assert output == workspace.root / "runs" / "cat"
    assert command[command.index("--steps") + 1] == "3" and "--validate-every" not in command
    assert "--resume" in workspace.train_command(options, resume=True)[0]
    import pytest

    from personalize.errors import UserError

    with pytest.raises(UserError, match="outside"):
        workspace.train_command(TrainOptions(images="../", run="cat"))
    with pytest.raises(UserError, match="outside"):
        workspace.save_job_file("jobs.yaml", "defaults: {model: tiny-sd15}\njobs:\n  - images: /etc\n")
    with pytest.raises(UserError, match="outside"):
        workspace.model("/etc/model.safetensors")
    assert workspace.model("stabilityai/stable-diffusion-xl-base-1.0") == "stabilityai/stable-diffusion-xl-base-1.0"
    saved = workspace.save_job_file("../x.yaml", "jobs:\n  - images: photos\n")
    assert saved == "batch/x.yaml" and (workspace.root / saved).is_file()
