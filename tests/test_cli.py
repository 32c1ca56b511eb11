"""The CLI shell: help, version, one-line user errors with exit 2, unexpected failures exit 1."""

import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from personalize import __version__
from personalize.cli import COMMAND_GROUP, main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "personalize", *args], capture_output=True, text=True, timeout=300)


def test_help_lists_every_registered_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    registered = {entry.name for entry in entry_points(group=COMMAND_GROUP)}
    assert registered, "no subcommand registered: is the package installed?"
    for name in registered:
        assert name in out


def test_every_registered_command_has_a_runner_and_help(capsys):
    for entry in entry_points(group=COMMAND_GROUP):
        assert main([entry.name, "--help"]) == 0
        assert "usage: personalize " + entry.name in capsys.readouterr().out


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"personalize {__version__}"


def test_unknown_command_is_one_line_exit_2(capsys):
    assert main(["trian"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1


def test_no_command_prints_help_and_exits_2(capsys):
    assert main([]) == 2
    assert "COMMAND" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "--prompt", "x"], "required: --model"),
        (["generate", "--model", "tiny-sd15", "--prompt", "x", "--steps", "0"], "--steps must be at least 1"),
        (["generate", "--model", "tiny-sd15", "--prompt", "x", "--width", "30"], "multiple of 8"),
        (["generate", "--model", "nowhere/at-all", "--prompt", "x"], "--model PATH"),
        (["generate", "--model", "tiny-sd15", "--prompt", "x", "--scheduler", "eulr"], "unknown scheduler"),
    ],
)
def test_user_errors_are_one_line_exit_2(capsys, args, message):
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err


def test_unexpected_failure_exits_1_and_hides_traceback_unless_debug(monkeypatch, capsys):
    import personalize.pipelines.cli as generate_cli

    def boom(args):
        raise RuntimeError("kaboom")

    monkeypatch.setattr(generate_cli, "run", boom)
    argv = ["generate", "--model", "tiny-sd15", "--prompt", "x"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "kaboom" in err and "--debug" in err and "Traceback" not in err
    with pytest.raises(RuntimeError, match="kaboom"):
        main([*argv, "--debug"])


def test_console_script_runs_as_a_process():
    result = run_cli("--version")
    assert result.returncode == 0 and __version__ in result.stdout
    result = run_cli("generate", "--model", "not-a-model", "--prompt", "x")
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: ") and len(result.stderr.strip().splitlines()) == 1


# Runs the CLI after planting what bitsandbytes 0.50 and kernels print when diffusers imports them on
# a CPU with AVX512-BF16 and no network: log records and a warning, raised while our command runs.
CHATTY_DEPENDENCIES = """
import importlib.abc, logging, sys, warnings

class Chatter(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "diffusers":
            logging.getLogger("kernels._internals.hf_hub").warning("Skipping publisher trust check for 'x/y'")
            logging.getLogger("bitsandbytes.backends.cpu.ops").warning("Failed to load CPU gemm_4bit_forward")
            warnings.warn("a dependency's own warning", UserWarning)
        return None

sys.meta_path.insert(0, Chatter())
from personalize.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_user_error_is_one_line_whatever_the_dependencies_log():
    argv = ["generate", "--model", "not-a-model", "--prompt", "x"]
    run = subprocess.run([sys.executable, "-c", CHATTY_DEPENDENCIES, *argv], capture_output=True, text=True)
    assert run.returncode == 2
    assert run.stderr.startswith("error: ") and len(run.stderr.strip().splitlines()) == 1, run.stderr
    verbose = subprocess.run(
        [sys.executable, "-c", CHATTY_DEPENDENCIES, *argv, "--verbose"], capture_output=True, text=True
    )
    assert verbose.returncode == 2
    assert "Skipping publisher trust check" in verbose.stderr and "a dependency's own warning" in verbose.stderr


@pytest.mark.parametrize(
    ("argv", "suggestion"),
    [
        (["train", "--images", "x", "--stpes", "3"], "--steps"),
        (["train", "--images", "x", "--learning-rate", "1e-4"], "--lr"),
        (["generate", "--model", "tiny-sd15", "--prompt", "x", "--seeed", "1"], "--seed"),
    ],
)
def test_a_mistyped_flag_names_the_nearest_one(capsys, argv, suggestion):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown flag") and f"did you mean {suggestion}?" in err
    assert len(err.strip().splitlines()) == 1


def test_a_mistyped_config_key_knows_other_tools_spellings(capsys, tmp_path):
    cat = str(Path(__file__).resolve().parents[1] / "examples" / "cat")
    argv = ["train", "--images", cat, "--model", "tiny-sd15", "--output", str(tmp_path / "o")]
    assert main([*argv, "--set", "learning_rat=1e-4"]) == 2
    assert "did you mean 'lr'?" in capsys.readouterr().err
    assert main([*argv, "--set", "data.resolutoin=64"]) == 2
    assert "did you mean 'data.resolution'?" in capsys.readouterr().err
