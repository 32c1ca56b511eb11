"""A messy folder: every usable image is used the same way, every unusable file is named with its reason."""

import io
import logging
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from personalize.data import DataConfig, build_dataset
from personalize.errors import UserError


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A valid PNG header claiming 900 MP in a few hundred bytes."""
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", zlib.compress(b"\0" * 64))


def encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


@pytest.fixture
def messy_folder(tmp_path: Path, make_image) -> Path:
    folder = tmp_path / "messy"
    folder.mkdir()
    make_image(96, 64, seed=1).save(folder / "good.jpg", quality=95)
    make_image(64, 64, seed=2).save(folder / "plain.png")
    (folder / "good.txt").write_text("a [trigger] cat on a sofa\n")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    make_image(96, 64, seed=3).save(folder / "rotated.jpg", exif=exif.tobytes(), quality=95)
    rgba = make_image(64, 64, seed=4, mode="RGBA")
    rgba.putalpha(Image.fromarray(np.repeat(np.array([0] * 32 + [255] * 32, dtype=np.uint8)[:, None], 64, axis=1)))
    rgba.save(folder / "alpha.png")
    make_image(64, 64, seed=5, mode="LA").save(folder / "gray_alpha.png")
    make_image(64, 64, seed=6).convert("P").save(folder / "palette.png")
    make_image(64, 64, seed=7, mode="L").save(folder / "gray.png")
    make_image(64, 64, seed=8, mode="L").convert("1").save(folder / "bilevel.png")
    make_image(64, 64, seed=9).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray((np.arange(64 * 64).reshape(64, 64) * 16).astype(np.uint16)).save(folder / "sixteen.png")
    Image.fromarray(np.random.default_rng(0).random((64, 64), dtype=np.float32)).save(folder / "float.tif")
    frames = [Image.new("RGB", (64, 64), color) for color in ("red", "blue")]
    frames[0].save(folder / "animated.gif", save_all=True, append_images=frames[1:])
    make_image(20, 24, seed=10).save(folder / "small.png")
    (folder / "empty.jpg").write_bytes(b"")
    jpeg = encoded(make_image(96, 64, seed=11), "JPEG")
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    png = encoded(make_image(64, 64, seed=12), "PNG")
    (folder / "truncated.png").write_bytes(png[: len(png) // 2])
    (folder / "fake.jpg").write_bytes(b"<html>404 not found</html>")
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(64))
    (folder / "bomb.png").write_bytes(bomb_png())
    (folder / "IMG_0001.HEIC").write_bytes(b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(32))
    (folder / "nested").mkdir()
    make_image(64, 64, seed=13).save(folder / "nested" / "deep.png")
    return folder


USED = [
    "alpha.png",
    "animated.gif",
    "bilevel.png",
    "cmyk.jpg",
    "float.tif",
    "good.jpg",
    "gray.png",
    "gray_alpha.png",
    "palette.png",
    "plain.png",
    "rotated.jpg",
    "sixteen.png",
    "small.png",
]
SKIPPED = {
    ".DS_Store": "not an image",
    "IMG_0001.HEIC": "HEIC/AVIF needs `pip install pillow-heif`, or convert it to JPEG",
    "bomb.png": "too large: over the decompression-bomb limit",
    "empty.jpg": "empty file",
    "fake.jpg": "not an image",
    "truncated.jpg": "truncated",
    "truncated.png": "truncated",
}


def test_exactly_which_files_are_used_and_why_others_are_not(messy_folder, caplog):
    with caplog.at_level(logging.WARNING):
        dataset = build_dataset(DataConfig(images=str(messy_folder), resolution=64, bucket_step=16))
    report = dataset.report
    assert [path.name for path in report.used] == USED
    assert {path.name: reason for path, reason in report.skipped} == SKIPPED
    assert report.summary().startswith(f"skipped 7 of {len(USED) + 7} files: .DS_Store (not an image), IMG_0001")
    assert "truncated.jpg (truncated)" in report.summary()
    assert report.summary() in caplog.text
    assert [warning.split(" ")[0] for warning in report.warnings] == ["small.png"]
    for index in range(len(dataset)):
        item = dataset[index]
        assert torch.isfinite(item["pixels"]).all() and item["pixels"].shape[0] == 3
    assert len(dataset) == len(USED)


def test_recursive_reads_subfolders(messy_folder):
    dataset = build_dataset(DataConfig(images=str(messy_folder), resolution=64, bucket_step=16, recursive=True))
    assert "deep.png" in [path.name for path in dataset.report.used]


def item_named(dataset, name):
    index = [record.path.name for record in dataset.records].index(name)
    return dataset[dataset.rows.index(index)]


def test_decoding_rules(messy_folder):
    config = DataConfig(
        images=str(messy_folder), resolution=64, bucket_step=16, bucketing=False, no_upscale=True, alpha_mask=True
    )
    dataset = build_dataset(config)
    assert item_named(dataset, "good.jpg")["prompt"] == "a sks cat on a sofa"
    assert item_named(dataset, "plain.png")["prompt"] == "a photo of sks"
    assert item_named(dataset, "rotated.jpg")["original_size"] == (96, 64)  # stored 96 wide, shown 64 wide
    alpha = item_named(dataset, "alpha.png")
    # top half transparent -> the white background there, mask 0; bottom half opaque, mask 1
    assert torch.equal(alpha["pixels"][:, :32], torch.ones(3, 32, 64))
    assert alpha["mask"][0, :32].max() == 0 and alpha["mask"][0, 32:].min() == 1
    assert torch.equal(item_named(dataset, "good.jpg")["mask"], torch.ones(1, 64, 64))
    sixteen = item_named(dataset, "sixteen.png")["pixels"]
    assert sixteen.max() == 1.0 and sixteen.min() == -1.0  # 16-bit range scaled, not clipped to white
    assert (sixteen > -1).float().mean() > 0.9
    gif = item_named(dataset, "animated.gif")["pixels"]
    assert torch.allclose(gif[:, 0, 0], torch.tensor([1.0, -1.0, -1.0]))  # first frame: red
    black = build_dataset(DataConfig(**{**config.__dict__, "background": "black"}))
    assert torch.equal(item_named(black, "alpha.png")["pixels"][:, :32], -torch.ones(3, 32, 64))
    assert item_named(black, "alpha.png")["key"] != alpha["key"]


def test_folder_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        build_dataset(DataConfig(images=str(tmp_path / "missing")))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no usable training image.*no files found"):
        build_dataset(DataConfig(images=str(empty)))
    (empty / "broken.jpg").write_bytes(b"")
    with pytest.raises(UserError, match=r"skipped 1 of 1 files: broken.jpg \(empty file\)"):
        build_dataset(DataConfig(images=str(empty)))
    with pytest.raises(UserError, match="data.images"):
        build_dataset(DataConfig())
    with pytest.raises(UserError, match="background"):
        build_dataset(DataConfig(images=str(empty), background="no-such-color"))


def test_large_jpeg_decodes_reduced_but_keeps_its_true_size(tmp_path, make_image):
    photo = make_image(64, 48, seed=1).resize((1600, 1200), Image.Resampling.BICUBIC)
    exif = Image.Exif()
    exif[0x0112] = 8  # rotated: shown 1200 wide, 1600 tall
    photo.save(tmp_path / "phone.jpg", quality=92, exif=exif.tobytes())
    dataset = build_dataset(DataConfig(images=str(tmp_path), resolution=64, bucket_step=16))
    item = dataset[0]
    assert item["original_size"] == (1600, 1200)
    height, width = item["target_size"]
    assert height > width and item["pixels"].shape == (3, height, width)
    full = photo.transpose(Image.Transpose.ROTATE_90).resize(dataset.plan(0).resized[::-1], Image.Resampling.LANCZOS)
    top, left = item["crop_top_left"]
    reference = np.asarray(full.crop((left, top, left + width, top + height)), dtype=np.float32) / 127.5 - 1
    assert np.abs(item["pixels"].permute(1, 2, 0).numpy() - reference).mean() < 0.05


def test_file_changed_after_scan_is_a_user_error(tmp_path, make_image):
    make_image(32, 32, seed=1).save(tmp_path / "a.png")
    dataset = build_dataset(DataConfig(images=str(tmp_path), resolution=32, bucket_step=16))
    make_image(32, 32, seed=2).save(tmp_path / "a.png")
    with pytest.raises(UserError, match="changed on disk"):
        dataset[0]
