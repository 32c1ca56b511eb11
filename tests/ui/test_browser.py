"""The page in headless Chromium (Debian's chromium, driven by Playwright): tabs, uploads as the intake
sees them, a bad upload's reason, and (slow) a whole training run from upload to a loadable adapter."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]

CAT = sorted((REPO / "examples" / "cat").glob("*.jpg"))


def fill(page, elem_id: str, value: str) -> None:
    page.locator(f"#{elem_id} textarea, #{elem_id} input").first.fill(value)


def upload_photos(page, run: str, files: list[Path]) -> None:
    fill(page, "run-name", run)
    page.locator("#photos input[type=file]").set_input_files([str(path) for path in files])


def test_page_has_four_tabs_and_shows_a_bad_upload_with_its_reason(page, server, tmp_path):
    root, _url = server
    for tab in ("Train", "Batch", "Generate", "Results"):
        assert page.get_by_role("tab", name=tab).is_visible()
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(CAT[0].read_bytes()[:300])  # a truncated JPEG
    script = tmp_path / "evil.sh"
    script.write_text("rm -rf /\n")
    upload_photos(page, "smoke", [*CAT[:2], broken, script])

    note = page.locator("#intake-note")
    note.get_by_text("Rejected uploads").wait_for()
    text = note.inner_text()
    assert "broken.jpg" in text and "evil.sh" in text and "not an image file (.sh)" in text
    assert "2 photos ready" in text
    intake = page.locator("#intake").inner_text()
    assert intake.count("64x64 bucket") == 2 and "a photo of sks smoke" in intake
    assert page.locator("#crops img").count() == 2
    stored = sorted(path.name for path in (root / "runs" / "smoke" / "images").iterdir())
    assert stored == [CAT[0].name, CAT[1].name]  # refused files never reach the run's folder


@pytest.mark.slow
def test_edited_caption_is_written_beside_the_image(page, server):
    root, _url = server
    upload_photos(page, "captions", CAT[:1])
    cell = page.locator("#intake").get_by_text("a photo of sks captions").filter(visible=True).first
    cell.dblclick()
    editor = page.locator("#intake textarea[aria-label='Edit cell']").last
    editor.fill("sks captions sitting on a red chair")
    editor.press("Enter")
    page.locator("#save-captions").click()
    page.get_by_text("1 caption(s) saved").wait_for()
    sidecar = root / "runs" / "captions" / "images" / CAT[0].with_suffix(".txt").name
    assert sidecar.read_text().strip() == "sks captions sitting on a red chair"


@pytest.mark.slow
def test_train_in_the_browser_then_load_the_adapter_with_stock_diffusers(page, server, tmp_path):
    root, _url = server
    upload_photos(page, "cat", CAT)
    page.locator("#intake-note").get_by_text("5 photos ready").wait_for()
    fill(page, "class-word", "cat")
    fill(page, "steps", "4")
    fill(page, "sample-every", "2")
    page.locator("#start").click()

    status = page.locator("#train-status")
    status.get_by_text("running").wait_for(timeout=120_000)
    page.locator("#samples img").first.wait_for(timeout=300_000)  # the step-2 grid, written mid-run
    status.get_by_text("done").wait_for(timeout=300_000)
    assert page.locator("#loss-plot canvas, #loss-plot svg").count() >= 1
    assert "loss" in status.inner_text()

    link = page.locator('#downloads a[download="pytorch_lora_weights.safetensors"]')
    with page.expect_download() as download:
        link.click()
    saved = tmp_path / "pytorch_lora_weights.safetensors"
    download.value.save_as(saved)
    losses = json.loads((root / "runs" / "cat" / "metrics.json").read_text())["losses"]
    assert len(losses) == 4

    # stock diffusers reads the downloaded file: the UNet's output moves away from the base's
    check = (
        "import sys, torch; from personalize.models import build_tiny; pipe = build_tiny('tiny-sd15'); "
        "unet = pipe.unet; g = torch.Generator().manual_seed(0); "
        "x = torch.randn(1, unet.config.in_channels, 8, 8, generator=g); "
        "text = torch.randn(1, 4, unet.config.cross_attention_dim, generator=g); "
        "base = unet(x, 10, text).sample.detach(); pipe.load_lora_weights(sys.argv[1]); "
        "layers = sum('lora_A' in name for name, _ in unet.named_parameters()); "
        "tuned = unet(x, 10, text).sample.detach(); "
        "print(layers, (tuned - base).abs().max().item()); assert layers > 0 and not torch.allclose(base, tuned)"
    )
    result = subprocess.run([sys.executable, "-c", check, str(saved)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]

    page.get_by_role("tab", name="Results").click()
    page.locator("#refresh-runs").click()
    page.locator("#result-run input").click()
    page.get_by_role("option", name="runs/cat").click()
    page.locator("#result-card").get_by_text("final loss").wait_for()
    assert page.locator("#result-samples img").count() == 2

    # Generate: the new run as an adapter at weight 0.8, two images and their grid
    page.get_by_role("tab", name="Generate").click()
    page.locator("#refresh-adapters").click()
    name = page.locator("#gen-adapters").get_by_text("runs/cat").filter(visible=True).first
    row = name.evaluate("cell => cell.closest('[role=gridcell]').dataset.row")
    page.locator(f"#gen-adapters [data-testid='cell-{row}-1']").filter(visible=True).first.dblclick()
    editor = page.locator("#gen-adapters textarea[aria-label='Edit cell']").last
    editor.fill("0.8")
    editor.press("Enter")
    page.locator("#gen-count input").fill("2")
    page.locator("#gen-steps input").fill("2")
    page.locator("#generate").click()
    page.locator("#gen-status").get_by_text("done").wait_for(timeout=300_000)
    page.wait_for_function("document.querySelectorAll('#gen-gallery img').length >= 3")
    generated = sorted((root / "generated").glob("*/*.png"))
    assert [path.name for path in generated] == ["000_seed0.png", "001_seed1.png", "grid.png"]
    metadata = json.loads(Image.open(generated[0]).text["personalize"])
    assert metadata["adapters"][0]["scale"] == 0.8 and metadata["adapters"][0]["path"].endswith("runs/cat")
