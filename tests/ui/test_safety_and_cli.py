"""`personalize ui` without a browser: flag checks, the install hint, upload and path safety, log parsing."""

import io
import sys

import pytest
from PIL import Image

from personalize.cli import main
from personalize.errors import UserError
from personalize.ui import runs
from personalize.ui.safety import accept_upload, check_upload, inside_root, safe_name


def test_listen_without_auth_refuses_in_one_line(capsys):
    assert main(["ui", "--listen"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --listen") and "--auth" in err[0]


def test_bad_auth_and_port_are_one_line_errors(capsys):
    assert main(["ui", "--auth", "nopassword"]) == 2
    assert main(["ui", "--port", "0"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and all(line.startswith("error: ") for line in lines)


def test_without_gradio_says_how_to_install(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "gradio", None)  # import gradio -> ImportError
    assert main(["ui", "--root", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == "error: the web UI needs gradio: pip install 'personalize[ui]'"


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("../../etc/passwd", "passwd"),
        ("C:\\photos\\..\\cat.jpg", "cat.jpg"),
        (".hidden.png", "hidden.png"),
        ("chat été.jpg", "chat_ete.jpg"),
        ("..", "file"),
    ],
)
def test_safe_name_drops_directories_and_odd_characters(name, expected):
    assert safe_name(name) == expected


def test_inside_root_refuses_escapes_and_symlinks(tmp_path):
    root = tmp_path / "root"
    (root / "runs").mkdir(parents=True)
    assert inside_root(root, "runs") == (root / "runs").resolve()
    with pytest.raises(UserError, match="outside the UI's root"):
        inside_root(root, "../elsewhere")
    with pytest.raises(UserError, match="outside the UI's root"):
        inside_root(root, "/etc")
    (root / "link").symlink_to(tmp_path)
    with pytest.raises(UserError, match="outside the UI's root"):
        inside_root(root, "link/anything")


def _png(path, size=(32, 24)):
    Image.new("RGB", size, "red").save(path)
    return path


def test_uploads_images_only_with_reasons(tmp_path):
    good = _png(tmp_path / "good.png")
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    fake = tmp_path / "fake.jpg"
    fake.write_bytes(b"not a jpeg at all")
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), "blue").save(buffer, "JPEG")
    truncated = tmp_path / "cut.jpg"
    truncated.write_bytes(buffer.getvalue()[:200])

    assert check_upload(good, "good.png") is None
    assert "not an image file" in check_upload(text, "notes.txt")
    assert check_upload(fake, "fake.jpg")  # the intake's decoder names the reason
    assert check_upload(truncated, "cut.jpg")

    folder = tmp_path / "run" / "images"
    stored, reason = accept_upload(good, "../../evil.png", folder)
    assert reason is None and stored == folder / "evil.png" and stored.is_file()
    again, _ = accept_upload(good, "evil.png", folder)
    assert again == folder / "evil-2.png"  # never overwrites an earlier upload
    refused, reason = accept_upload(text, "notes.txt", folder)
    assert refused is None and "not an image" in reason
    assert sorted(path.name for path in folder.iterdir()) == ["evil-2.png", "evil.png"]


def test_upload_size_limit(tmp_path, monkeypatch):
    from personalize.ui import safety

    monkeypatch.setattr(safety, "MAX_UPLOAD_BYTES", 100)
    big = _png(tmp_path / "big.png", (256, 256))
    assert "too large" in check_upload(big, "big.png")


def test_live_loss_from_the_progress_line():
    log = (
        "loading\ntraining:   0%|          | 0/4 [00:00<?, ?it/s]\r"
        "training:  25%|##5       | 1/4 [00:01<00:03,  1.0s/it, loss=0.5000, lr=1.00e-03]\r"
        "training:  50%|#####     | 2/4 [00:02<00:02,  1.0s/it, loss=0.2500, lr=1.00e-03]\r"
        "training:  50%|#####     | 2/4 [00:02<00:02,  1.0s/it, loss=0.2400, lr=1.00e-03]\r"
        "samples at step 2: 100%|####| 3/3 [00:00<00:00]\n"
        "training:  75%|#######5  | 3/4 [00:03<00:01,  1.0s/it, loss=nan, lr=1.00e-03]\n"
    )
    assert runs.losses_from_log(log) == [(1, 0.5), (2, 0.24)]
