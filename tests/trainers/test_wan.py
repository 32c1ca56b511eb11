"""The first video family (Wan 2.1 T2V) end to end on tiny-wan: clip intake, CLI and Python API, stock loaders."""

import copy

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from personalize.cli import main

from .conftest import assert_resume_reproduces, one_line_error

av = pytest.importorskip("av")

SIZE = 48


def _frames(count):
    """Frames whose content moves: a bright bar slides right, the red channel ramps."""
    frames = []
    for index in range(count):
        array = np.zeros((SIZE, SIZE, 3), np.uint8)
        array[..., 0] = 20 * index
        array[:, 4 * index : 4 * index + 8, 1] = 255
        frames.append(array)
    return frames


def _mp4(path, count, fps):
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = SIZE, SIZE, "yuv420p"
        for array in _frames(count):
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


@pytest.fixture
def clips(tmp_path):
    """An MP4 (12 frames at 8 fps), a GIF (9 frames at 8 fps), a still PNG and a broken MP4."""
    folder = tmp_path / "clips"
    folder.mkdir()
    _mp4(folder / "walk.mp4", 12, 8)
    gif = [Image.fromarray(array) for array in _frames(9)]
    gif[0].save(folder / "wave.gif", save_all=True, append_images=gif[1:], duration=125, loop=0)
    Image.fromarray(_frames(1)[0]).save(folder / "still.png")
    (folder / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"not a video" * 20)
    (folder / "walk.txt").write_text("sks bar sliding right")
    return folder


def test_clip_frames_resample_to_the_asked_rate():
    from personalize.data.video import frame_times

    times = [index / 8 for index in range(12)]  # an 8 fps file
    assert frame_times(times, 5, 8.0) == [0, 1, 2, 3, 4]
    assert frame_times(times, 5, 16.0) == [0, 0, 1, 1, 2]  # faster than the file: frames repeat
    assert frame_times(times, 5, 4.0) == [0, 2, 4, 6, 8]  # slower: frames are dropped
    assert frame_times(times, 5, 0.0) == [0, 1, 2, 3, 4]  # 0: the file's own rate
    assert len(frame_times(times, 17, 8.0)) == 12  # too short: the caller skips it


def test_intake_gives_clips_one_frame_stills_and_names_the_broken_file(clips):
    from personalize.data import DataConfig, build_dataset

    dataset = build_dataset(DataConfig(images=str(clips), resolution=32, bucket_step=16, frames=5, fps=8))
    assert dataset.report.skipped[0][0].name == "broken.mp4" and "not a decodable video" in dataset.report.skipped[0][1]
    items = {record.path.name: dataset[number] for number, record in enumerate(dataset.records)}
    assert items["walk.mp4"]["pixels"].shape == (3, 5, 32, 32) and items["wave.gif"]["pixels"].shape == (3, 5, 32, 32)
    assert items["still.png"]["pixels"].shape == (3, 1, 32, 32)
    assert items["walk.mp4"]["prompt"] == "sks bar sliding right"
    walk = items["walk.mp4"]["pixels"]
    assert (walk[:, 1:] - walk[:, :-1]).abs().mean() > 0.05  # the frames differ: it moves
    assert sorted(dataset.buckets) == [(32, 32, 1), (32, 32, 5), (32, 32, 5)]  # clips batch by length too
    short = build_dataset(DataConfig(images=str(clips), resolution=32, bucket_step=16, frames=17, fps=8))
    assert {path.name for path, _ in short.report.skipped} == {"broken.mp4", "walk.mp4", "wave.gif"}
    assert "too short" in dict((path.name, why) for path, why in short.report.skipped)["walk.mp4"]


def _argv(images, out, cache_dir, *more):
    argv = ["train", "--images", str(images), "--model", "tiny-wan", "--steps", "2", "--resolution", "32"]
    argv += ["--output", str(out), "--set", f"data.cache_dir={cache_dir}", "--set", "validation_steps=2"]
    argv += ["--set", "validation_images=1", "--set", "checkpoint_every=0", "--set", "data.frames=5"]
    return [*argv, "--set", "data.fps=8", "--rank", "4", *more]


@pytest.mark.parametrize("method", ["lora", "lokr"])
def test_wan_trains_on_clips_through_the_cli(capsys, caplog, tmp_path, cache_dir, clips, method):
    out = tmp_path / "run"
    assert main(_argv(clips, out, cache_dir, "--method", method)) == 0
    assert "tiny-wan (wan)" in capsys.readouterr().out and "broken.mp4 (not a decodable video" in caplog.text
    keys = load_file(str(out / "run.safetensors")).keys()
    assert keys and all(key.startswith("lora_unet_blocks_") for key in keys)  # Wan's own names: what ComfyUI maps
    assert (out / "pytorch_lora_weights.safetensors").is_file() == (method == "lora")
    with Image.open(out / "samples" / "step-000002.gif") as sample:  # the sample is a 5-frame clip
        assert sample.n_frames == 5 and sample.size == (32, 32)


def _frames_of(pipe):
    generator = torch.Generator().manual_seed(0)
    arguments = dict(height=32, width=32, num_frames=5, num_inference_steps=2, guidance_scale=1.0)
    return pipe("a photo of sks cat", generator=generator, output_type="pt", **arguments).frames  # (1, F, 3, H, W)


def test_stock_wan_load_lora_weights_gives_our_loaders_frames(quick, tiny_pipelines, clips):
    from personalize.pipelines import load_adapter

    options = dict(model="tiny-wan", images=str(clips), method="lora", rank=4, lr=5e-2, steps=3, resolution=32)
    result = quick(**options, frames=5, fps=8, validation_images=0)
    ours, stock, base = (copy.deepcopy(tiny_pipelines("tiny-wan")) for _ in range(3))
    load_adapter(ours, result.output_dir)
    stock.load_lora_weights(str(result.output_dir))
    with torch.no_grad():
        mine, theirs, plain = _frames_of(ours), _frames_of(stock), _frames_of(base)
    assert mine.shape == (1, 5, 3, 32, 32)
    torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-4)
    assert (mine - plain).abs().max() > 1e-3  # the adapter changes the clip


def test_the_single_file_in_wans_own_names_loads_in_stock_diffusers_as_ours(quick, tiny_pipelines, clips):
    """The ComfyUI file (lora_unet_blocks_0_self_attn_q...) through diffusers' musubi-tuner converter: the
    same clip as our loader, so every renamed layer lands on the layer it was trained on."""
    from personalize.pipelines import load_adapter

    options = dict(model="tiny-wan", images=str(clips), method="lora", rank=4, lr=5e-2, steps=3, resolution=32)
    result = quick(**options, frames=5, fps=8, validation_images=0)
    ours, stock = (copy.deepcopy(tiny_pipelines("tiny-wan")) for _ in range(2))
    load_adapter(ours, result.output_dir / "out.safetensors")
    stock.load_lora_weights(str(result.output_dir), weight_name="out.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(_frames_of(ours), _frames_of(stock), rtol=1e-4, atol=1e-4)


def test_lokr_loads_into_a_stock_wan_pipeline_with_load_adapter(quick, tiny_pipelines):
    from personalize import adapters
    from personalize.pipelines import load_adapter

    result = quick(model="tiny-wan", method="lokr", rank=4, lr=5e-2, steps=3, resolution=32, validation_images=0)
    pipe, base = copy.deepcopy(tiny_pipelines("tiny-wan")), copy.deepcopy(tiny_pipelines("tiny-wan"))
    load_adapter(pipe, result.output_dir, name="subject")
    assert len(adapters.state_dict(pipe.transformer, "subject")) == len(
        load_file(str(result.output_dir / "out.safetensors"))
    )
    with torch.no_grad():
        assert (_frames_of(pipe) - _frames_of(base)).abs().max() > 1e-3


def test_nf4_wan_trains_on_cpu(quick):
    pytest.importorskip("bitsandbytes")
    result = quick(model="tiny-wan", method="lora", rank=4, resolution=32, quantize="nf4", validation_images=0)
    assert result.metrics["steps"] == 2 and torch.isfinite(torch.tensor(result.metrics["final_loss"]))


def test_interrupted_wan_run_resumes_to_the_same_adapter(quick, monkeypatch, tmp_path, clips):
    settings = dict(model="tiny-wan", images=str(clips), method="lora", rank=4, steps=4, lr=1e-3, resolution=32)
    settings.update(frames=5, fps=8, checkpoint_every=2, validation_images=0, lr_scheduler="cosine")
    assert_resume_reproduces(quick, monkeypatch, tmp_path, **settings)


def test_bad_video_input_is_one_line_exit_2(capsys, tmp_path, cache_dir, clips, monkeypatch):
    out = tmp_path / "out"
    error = one_line_error(capsys, [*_argv(clips, out, cache_dir), "--set", "data.frames=6"])
    assert "data.frames 6" in error and "4k + 1" in error and "use e.g. 5" in error
    flux = _argv(clips, out, cache_dir)
    flux[flux.index("tiny-wan")] = "tiny-flux"
    assert "data.frames is for video models" in one_line_error(capsys, flux)
    assert not out.exists()
    monkeypatch.setitem(__import__("sys").modules, "av", None)  # PyAV not installed
    error = one_line_error(capsys, _argv(clips, out, cache_dir))
    assert "pip install 'personalize[video]'" in error


@pytest.mark.slow
@pytest.mark.parametrize("flags", [[], ["--gradient-checkpointing"], ["--mixed-precision", "bf16"]])
def test_planned_peak_is_within_20_percent_of_the_measured_rss_on_clips(tmp_path, flags):
    """Wan2.1-T2V-1.3B's width (12 heads x 128) with one block, 17-frame clips at 256 px, on CPU."""
    import os
    import subprocess
    import sys

    from personalize.models.tiny_video import reduced_wan
    from personalize.plan import GB, Settings, plan

    folder, clips = tmp_path / "wan", tmp_path / "clips"
    reduced_wan(1).save_pretrained(folder)
    clips.mkdir()
    for number in range(2):
        _mp4(clips / f"clip{number}.mp4", 12, 8)  # 17 frames at 16 fps: 1.06 s of a 1.5 s file
    code = (
        "import resource, sys; from personalize.cli import main; code = main(sys.argv[1:]); "
        "print('PEAK', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(code)"
    )
    argv = ["train", "--images", str(clips), "--model", str(folder), "--resolution", "256", "--steps", "2"]
    argv += ["--rank", "4", "--output", str(tmp_path / "out"), "--set", "validation_images=0", *flags]
    argv += ["--set", "data.frames=17", "--set", "data.fps=16", "--set", f"data.cache_dir={tmp_path / 'cache'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "2", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code, *argv], env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-2000:]
    measured = int(done.stdout.split("PEAK")[-1].split()[0]) * 1024
    settings = Settings(
        resolution=256,
        rank=4,
        frames=17,
        mixed_precision="bf16" if "bf16" in flags else "no",
        gradient_checkpointing="--gradient-checkpointing" in flags,
    )
    planned = plan(str(folder), settings, "cpu").peak
    error = (planned - measured) / measured
    print(f"wan-1536 {' '.join(flags)}: planned {planned / GB:.2f} GB, measured {measured / GB:.2f} GB, {error:+.1%}")
    assert abs(error) <= 0.20


def test_generate_writes_clips_as_gifs(tmp_path, capsys):
    out = tmp_path / "gen"
    argv = ["generate", "--model", "tiny-wan", "--prompt", "a photo of sks cat", "--steps", "2", "--width", "32"]
    argv += ["--height", "32", "--num-frames", "5", "--num-images", "2", "--output", str(out)]
    assert main(argv) == 0
    assert sorted(path.name for path in out.iterdir()) == ["000_seed0.gif", "001_seed1.gif"]
    with Image.open(out / "000_seed0.gif") as clip:
        assert clip.n_frames == 5 and clip.size == (32, 32)
