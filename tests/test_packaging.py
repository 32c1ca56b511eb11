"""One distribution, one import name: the wheel and the editable install both carry everything."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAPPED = {"personalize.trainers": "trainers", "personalize.pipelines": "pipelines", "personalize.configs": "configs"}
CHECK = """
import sys
from importlib import resources
from importlib.metadata import entry_points
import personalize, personalize.trainers, personalize.pipelines, personalize.configs
root = sys.argv[1]
for module in (personalize, personalize.trainers, personalize.pipelines, personalize.configs):
    assert module.__file__.startswith(root), (module.__name__, module.__file__, root)
presets = [p.name for p in resources.files("personalize.configs").iterdir() if p.name.endswith(".yaml")]
assert "tiny.yaml" in presets, presets
commands = {e.name: e.value for e in entry_points(group="personalize.commands")}
assert "generate" in commands, commands
print("ok", sorted(presets))
"""


def _packages_on_disk() -> set[str]:
    found = set()
    for init in (ROOT / "personalize").rglob("__init__.py"):
        found.add(".".join(init.parent.relative_to(ROOT).parts))
    for package, folder in MAPPED.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            found.add(".".join([package, *init.parent.relative_to(ROOT / folder).parts]))
    return found


def test_every_package_folder_is_listed_in_pyproject():
    import tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    assert _packages_on_disk() == listed


def test_wheel_holds_mapped_packages_presets_and_commands(tmp_path):
    source = tmp_path / "src"
    for name in ("personalize", "trainers", "pipelines", "configs"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    wheel_dir = tmp_path / "wheel"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheel_dir), "."],
        cwd=source,
        check=True,
        capture_output=True,
    )
    (wheel,) = wheel_dir.glob("personalize-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "personalize/trainers/__init__.py" in names
    assert "personalize/pipelines/generate.py" in names
    assert "personalize/configs/tiny.yaml" in names
    assert not any(name.startswith(("trainers/", "pipelines/", "configs/", "tests/")) for name in names)
    # Install the wheel alone into a folder and import from there, with no site-packages at all.
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    result = subprocess.run(
        [sys.executable, "-S", "-c", f"import sys; sys.path.insert(0, {str(target)!r}); " + CHECK, str(target)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")


def test_editable_install_maps_the_top_level_folders():
    result = subprocess.run([sys.executable, "-c", CHECK, str(ROOT)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
