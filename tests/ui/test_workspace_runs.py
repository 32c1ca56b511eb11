"""The tabs' actions end to end without a browser: real tiny training runs through the queue (slow)."""

import json
from pathlib import Path

import pytest
from PIL import Image

from personalize.ui import runs
from personalize.ui.jobs import DONE, JobQueue
from personalize.ui.workspace import GenerateOptions, TrainOptions, Workspace

pytestmark = pytest.mark.slow


def _photos(folder, count=2):
    folder.mkdir(parents=True)
    for index in range(count):
        Image.new("RGB", (80, 64), (40 * index, 120, 200)).save(folder / f"photo-{index}.png")


def test_two_training_runs_on_one_device_run_one_after_the_other_then_generate(tmp_path):
    workspace = Workspace(tmp_path / "root", queue=JobQueue(tmp_path / "root" / ".state", devices=["cpu"]))
    _photos(workspace.root / "photos" / "toy")
    first = workspace.start_training(TrainOptions(images="photos/toy", run="a", steps=2))
    second = workspace.start_training(TrainOptions(images="photos/toy", run="b", steps=2, sample_every=1))
    done_first, done_second = workspace.queue.wait(first.id, 600), workspace.queue.wait(second.id, 600)
    assert (done_first.status, done_second.status) == (DONE, DONE), done_second.error_line()
    assert done_second.started >= done_first.finished  # queued behind the first, never beside it

    run = workspace.root / "runs" / "b"
    assert [step for step, _ in runs.losses(run)] == [1, 2]  # metrics.json
    live = runs.losses_from_log(Path(done_second.log).read_text())  # what the page plotted while it ran
    assert [step for step, _ in live] == [1, 2] and live[-1][1] == pytest.approx(runs.losses(run)[-1][1], abs=1e-4)
    assert [path.name for path in runs.samples(run)] == ["step-000001.png", "step-000002.png"]
    assert (run / "pytorch_lora_weights.safetensors") in runs.adapter_files(run)
    assert "class_word: toy" in (run / "config.yaml").read_text()  # the picked folder's name, as the CLI does

    options = GenerateOptions(
        model="tiny-sd15", prompt="a photo of sks toy", adapters=[("runs/b", 0.7)], num_images=2, steps=2
    )
    finished = workspace.queue.wait(workspace.start_generation(options).id, 600)
    assert finished.status == DONE, finished.error_line()
    folder = Path(finished.output)
    assert sorted(path.name for path in folder.glob("*.png")) == ["000_seed0.png", "001_seed1.png", "grid.png"]
    metadata = json.loads(Image.open(folder / "000_seed0.png").text["personalize"])
    assert metadata["adapters"][0]["scale"] == 0.7


def test_batch_tab_checks_then_runs_a_job_file_through_personalize_batch(tmp_path):
    workspace = Workspace(tmp_path / "root", queue=JobQueue(tmp_path / "root" / ".state", devices=["cpu"]))
    _photos(workspace.root / "photos" / "toy")
    _photos(workspace.root / "photos" / "mug")
    text = "model: tiny-sd15\nsteps: 2\njobs:\n  - images: ../photos/*\n"
    saved = workspace.save_job_file("two.yaml", text)
    check = workspace.queue.wait(workspace.start_batch(saved, dry_run=True).id, 600)
    assert check.status == DONE, check.error_line()
    log = Path(check.log).read_text()
    assert "toy" in log and "mug" in log

    finished = workspace.queue.wait(workspace.start_batch(saved).id, 900)
    assert finished.status == DONE, finished.error_line()
    report = json.loads((workspace.root / "batch" / "two" / "batch.json").read_text())
    jobs = report["jobs"] if isinstance(report, dict) else report
    assert sorted(job["status"] for job in jobs) == ["done", "done"]
    assert len(workspace.run_names()) >= 2  # the batch's runs show in Results


def test_memory_plan_button_runs_the_planner():
    from personalize.ui.app import memory_plan

    text = memory_plan("tiny-flux", "lora", 64, "")
    assert "peak" in text and "GB" in text


def test_listen_with_auth_serves_only_after_login(tmp_path, launch):
    import urllib.error
    import urllib.parse
    import urllib.request

    url = launch(tmp_path / "root", "--listen", "--auth", "ann:secret")
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url + "config", timeout=10)
    assert refused.value.code == 401
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor())
    wrong = urllib.parse.urlencode({"username": "ann", "password": "guess"}).encode()
    with pytest.raises(urllib.error.HTTPError):
        opener.open(url + "login", data=wrong, timeout=10)
    right = urllib.parse.urlencode({"username": "ann", "password": "secret"}).encode()
    assert opener.open(url + "login", data=right, timeout=10).status == 200
    assert opener.open(url + "config", timeout=10).status == 200


def test_stop_saves_the_adapter_and_resume_finishes_the_run(tmp_path):
    import time

    from personalize.ui.jobs import STOPPED

    workspace = Workspace(tmp_path / "root", queue=JobQueue(tmp_path / "root" / ".state", devices=["cpu"]))
    _photos(workspace.root / "photos" / "toy")
    options = TrainOptions(images="photos/toy", run="long", steps=40)
    job = workspace.start_training(options)
    deadline = time.monotonic() + 600
    while not runs.losses_from_log(Path(job.log).read_text() if Path(job.log).is_file() else ""):
        assert time.monotonic() < deadline and workspace.queue.get(job.id).status in ("queued", "running")
        time.sleep(0.2)
    assert "stopping" in workspace.queue.stop(job.id)
    stopped = workspace.queue.wait(job.id, 600)
    run = workspace.root / "runs" / "long"
    assert (stopped.status, stopped.returncode) == (STOPPED, 130)
    assert "--resume" in stopped.error_line()  # the CLI's own line: where the adapter and checkpoint are
    assert (run / "pytorch_lora_weights.safetensors").is_file() and any((run / "checkpoints").iterdir())
    done_at = len(runs.metrics(run)["losses"])
    assert 0 < done_at < 40

    resumed = workspace.queue.wait(workspace.start_training(options, resume=True).id, 600)
    assert resumed.status == DONE, resumed.error_line()
    assert len(runs.metrics(run)["losses"]) == 40
