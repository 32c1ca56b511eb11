"""Importing personalize never fetches or runs code from the Hub (bitsandbytes' CPU kernel probe)."""

import os
import subprocess
import sys

import pytest

from personalize.hub_code import ALLOW_ENV, HubCodeRefused, refuse_hub_kernels

PROBE = """
import personalize, kernels
try:
    kernels.get_kernel("kernels-community/quantization-bitsandbytes", version=1)
except Exception as error:
    print(type(error).__name__)
"""


@pytest.mark.skipif(
    subprocess.run([sys.executable, "-c", "import kernels"], capture_output=True).returncode != 0,
    reason="the kernels package is not installed",
)
def test_kernels_imported_after_personalize_refuses_hub_code():
    env = {key: value for key, value in os.environ.items() if key != ALLOW_ENV}
    env["HF_HUB_OFFLINE"] = "0"  # the refusal comes from us, before any network or offline check
    run = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=120)
    assert run.stdout.strip() == "HubCodeRefused", run.stdout + run.stderr


def test_the_guard_refuses_unless_the_user_opts_in(monkeypatch):
    calls = []
    guarded = refuse_hub_kernels(lambda repo_id, **kwargs: calls.append(repo_id) or "kernel")
    monkeypatch.delenv(ALLOW_ENV, raising=False)
    with pytest.raises(HubCodeRefused, match=ALLOW_ENV):
        guarded("kernels-community/quantization-bitsandbytes", version=1)
    assert calls == []
    monkeypatch.setenv(ALLOW_ENV, "1")
    assert guarded("kernels-community/quantization-bitsandbytes", version=1) == "kernel"
    assert calls == ["kernels-community/quantization-bitsandbytes"]
