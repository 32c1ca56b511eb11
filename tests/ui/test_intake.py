"""The Train tab's intake view is personalize.data's: same verdicts, buckets, captions and crops."""

from PIL import Image

from personalize.ui.intake import intake_view, save_captions


def test_intake_view_lists_used_and_skipped_files_with_crops(tmp_path):
    folder = tmp_path / "toy"
    folder.mkdir()
    Image.new("RGB", (512, 256), "red").save(folder / "wide.png")
    Image.new("RGB", (256, 256), "blue").save(folder / "square.png")
    (folder / "square.txt").write_text("sks toy on a [trigger] table\n")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")

    rows, crops = intake_view(folder, "sks", "toy", 256)
    by_file = {row.file: row for row in rows}
    assert by_file["broken.jpg"].status == "skipped" and by_file["broken.jpg"].detail
    assert by_file["square.png"].caption == "sks toy on a sks table"  # the sidecar, trigger filled in
    assert by_file["wide.png"].caption == "a photo of sks toy"
    assert by_file["wide.png"].detail != by_file["square.png"].detail  # an aspect bucket, not a square
    assert by_file["square.png"].detail == "256x256 bucket"
    assert len(crops) == 2
    for image, label in crops:  # each crop is exactly its bucket ("wide.png: WxH")
        assert label.endswith(f"{image.width}x{image.height}")
        assert by_file[label.split(":")[0]].detail == f"{image.width}x{image.height} bucket"

    assert save_captions(folder, {"wide.png": "sks toy, wide shot", "../square.png": "", "missing.png": "x"}) == 1
    assert (folder / "wide.txt").read_text() == "sks toy, wide shot\n"
    assert not (folder / "square.txt").exists()  # an emptied caption removes the sidecar
    rows, _ = intake_view(folder, "sks", "toy", 256)
    assert {row.file: row.caption for row in rows}["wide.png"] == "sks toy, wide shot"
