"""Job files and validation: every job resolved as `personalize train` would, problems named with their line."""

import sys

import pytest

from personalize.batch import jobfile, jobs, run
from personalize.cli import main
from personalize.errors import UserError

from .conftest import tiny_yaml, write_yaml


def test_a_glob_makes_one_job_per_folder_with_words_from_its_name(photos, tmp_path, capsys):
    spec = write_yaml(
        tmp_path / "jobs.yaml",
        tiny_yaml("  - images: photos/*\n  - images: photos/sks_cat\n    name: cat8\n    rank: 8\n"),
    )
    assert main(["batch", str(spec), "--dry-run", "--output", str(tmp_path / "runs")]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[1:]}
    assert set(rows) == {"sks_cat", "zwx_dog", "cat8"}
    assert rows["sks_cat"][1:6] == ["13", "3", "sks", "cat", "lora"]  # line, images, token, class, method
    assert rows["zwx_dog"][1:5] == ["13", "2", "zwx", "dog"]
    assert rows["cat8"][1] == "14" and rows["cat8"][-1] == "train"
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing

    prepared = jobs.prepare(jobfile.read_job_file(spec), tmp_path / "runs")
    by_name = {job.name: job for job in prepared}
    assert by_name["cat8"].config["rank"] == 8 and by_name["sks_cat"].config["rank"] == 4
    assert by_name["sks_cat"].config["output"] == str(tmp_path / "runs" / "sks_cat")
    # prior preservation: one shared class-image set per base + class prompt + size, in the cache
    cat_dirs = {by_name[name].config["data"]["class_dir"] for name in ("sks_cat", "cat8")}
    assert len(cat_dirs) == 1 and by_name["zwx_dog"].config["data"]["class_dir"] not in cat_dirs
    assert by_name["sks_cat"].fingerprint != by_name["cat8"].fingerprint


def test_csv_rows_are_jobs(photos, tmp_path):
    csv = tmp_path / "jobs.csv"
    csv.write_text("images,token,steps,data.flip\nphotos/sks_cat,,5,\nphotos/zwx_dog,ohwx,7,0.5\n")
    spec = jobfile.read_job_file(csv)
    prepared = jobs.prepare(spec, tmp_path / "runs", preset="tiny")
    assert [(job.name, job.line) for job in prepared] == [("sks_cat", 2), ("zwx_dog", 3)]
    assert [job.config["steps"] for job in prepared] == [5, 7]
    assert prepared[1].config["data"]["token"] == "ohwx" and prepared[1].config["data"]["flip"] == 0.5
    assert prepared[0].config["model"] == "tiny-sd15"  # from the preset


def test_fingerprint_follows_image_content_not_file_times(photos, tmp_path):
    spec = write_yaml(tmp_path / "jobs.yaml", tiny_yaml())
    before = {job.name: job.fingerprint for job in jobs.prepare(jobfile.read_job_file(spec), tmp_path / "r")}
    image = sorted((photos / "zwx_dog").iterdir())[0]
    image.touch()
    assert {job.name: job.fingerprint for job in jobs.prepare(jobfile.read_job_file(spec), tmp_path / "r")} == before
    image.write_bytes((photos / "sks_cat" / sorted(p.name for p in (photos / "sks_cat").iterdir())[0]).read_bytes())
    after = {job.name: job.fingerprint for job in jobs.prepare(jobfile.read_job_file(spec), tmp_path / "r")}
    assert after["sks_cat"] == before["sks_cat"] and after["zwx_dog"] != before["zwx_dog"]


def test_every_problem_is_reported_with_its_line_before_anything_trains(photos, tmp_path, capsys):
    (photos / "zwx_dog" / "broken.jpg").write_text("<html>not an image</html>")
    text = tiny_yaml(
        "  - images: photos/*\n"  # line 13 (11 default keys, then jobs:)
        "  - images: photos/missing\n"  # line 14
        "  - images: photos/sks_cat\n"  # line 15
        "    name: typo\n"
        "    stpes: 10\n"  # line 17
    )
    spec = write_yaml(tmp_path / "jobs.yaml", text)
    assert main(["batch", str(spec), "--output", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr()
    lines = (err.out + err.err).splitlines()
    assert any("jobs.yaml:13: job 'zwx_dog': broken.jpg is unreadable" in line for line in lines), lines
    assert any("jobs.yaml:14" in line and "photos/missing" in line and "does not exist" in line for line in lines)
    assert any("jobs.yaml:17: unknown key 'stpes' (did you mean 'steps'?)" in line for line in lines), lines
    assert err.err.strip().splitlines()[-1].startswith("error: 2 of 4 jobs are invalid")
    assert not (tmp_path / "runs").exists()
    # the dry run shows the same table with the invalid jobs marked, and exits 2
    assert main(["batch", str(spec), "--dry-run", "--output", str(tmp_path / "runs")]) == 2
    assert "invalid: " in capsys.readouterr().out


def test_a_glob_that_matches_nothing_and_duplicate_names_are_invalid(photos, tmp_path):
    spec = write_yaml(
        tmp_path / "jobs.yaml", tiny_yaml("  - images: nothing/*\n  - photos/sks_cat\n  - photos/sks_cat\n")
    )
    results = run(spec, dry_run=True, output=tmp_path / "runs", echo=lambda line: None)
    assert [result.status for result in results] == ["invalid", "pending", "invalid"]
    assert "matches no folder" in results[0].reason
    assert "also used at jobs.yaml:14" in results[2].reason


def test_ray_backend_without_ray_says_how_to_install(photos, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(UserError, match=r"pip install 'personalize\[ray\]'"):
        run(
            [str(photos / "sks_cat")],
            defaults={"model": "tiny-sd15"},
            backend="ray",
            output=tmp_path / "r",
            echo=lambda line: None,
            progress=False,
        )


def test_bad_job_files_are_one_line_errors(tmp_path):
    for name, text, message in [
        ("a.yaml", "steps: 3\n", "non-empty 'jobs:' list"),
        ("b.yaml", "jobs: [\n", "not valid YAML"),
        ("c.csv", "steps\n3\n", "'images'"),
        ("d.txt", "", ".yaml, .yml or .csv"),
    ]:
        (tmp_path / name).write_text(text)
        with pytest.raises(UserError, match=message):
            jobfile.read_job_file(tmp_path / name)


def test_the_dry_run_shows_the_memory_plan_when_a_planner_exists(photos, tmp_path, monkeypatch, capsys):
    """`personalize.plan` (another part of the toolkit) sizes each job: plan(model, Settings(...)) -> .peak."""
    import dataclasses
    import types

    @dataclasses.dataclass(frozen=True)
    class Settings:
        method: str = "lora"
        rank: int = 4
        resolution: int = 512

    asked = []

    def plan(model, settings, device="cuda"):
        asked.append((model, settings))
        return types.SimpleNamespace(peak=settings.rank * 2**30)

    monkeypatch.setitem(sys.modules, "personalize.plan", types.SimpleNamespace(plan=plan, Settings=Settings))
    spec = write_yaml(tmp_path / "jobs.yaml", tiny_yaml("  - images: photos/sks_cat\n    rank: 8\n"))
    assert main(["batch", str(spec), "--dry-run", "--output", str(tmp_path / "runs")]) == 0
    header, row = capsys.readouterr().out.splitlines()[:2]
    assert "memory" in header and "8.00 GiB" in row
    assert asked == [("tiny-sd15", Settings(method="lora", rank=8, resolution=64))]
