"""A real `personalize ui` server and headless Debian Chromium driven by Playwright (no browser download)."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("PERSONALIZE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(root: Path, *extra: str, timeout: float = 120.0):
    """`personalize ui --root ROOT --port FREE`; returns (process, url) once the page answers."""
    port = _free_port()
    log = open(root.parent / f"ui-server-{port}.log", "wb")  # noqa: SIM115 (closed with the process)
    process = subprocess.Popen(
        [sys.executable, "-m", "personalize", "ui", "--root", str(root), "--port", str(port), *extra],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"personalize ui exited: {Path(log.name).read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return process, url
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"personalize ui did not answer within {timeout:.0f} s")


def stop_server(process) -> None:
    process.send_signal(signal.SIGINT)
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file() or shutil.which(CHROMIUM) is None:
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium; `make setup` does it as root)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the test extra")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pytest.importorskip("gradio", reason="the ui extra (gradio) is in the test extra")
    root = tmp_path_factory.mktemp("ui") / "root"
    root.mkdir()
    process, url = start_server(root)
    yield root, url
    stop_server(process)


@pytest.fixture
def page(browser, server):
    context = browser.new_context(accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.goto(server[1])
    page.get_by_role("tab", name="Train").wait_for()  # the page is built by the browser after load
    # the page's load event (which sets the run name to the newest run's) has come back once the timer
    # has filled in the status: typing a run name before that would be overwritten
    page.locator("#train-status").get_by_text("Job", exact=False).or_(
        page.locator("#train-status").get_by_text("No training job")
    ).first.wait_for()
    yield page
    context.close()


@pytest.fixture
def launch():
    """launch(root, *flags) -> url of a `personalize ui` server, stopped after the test."""
    pytest.importorskip("gradio", reason="the ui extra (gradio) is in the test extra")
    started = []

    def start(root: Path, *extra: str) -> str:
        process, url = start_server(root, *extra)
        started.append(process)
        return url

    yield start
    for process in started:
        stop_server(process)
