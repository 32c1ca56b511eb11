"""Short clips for video models: a video file (MP4, WebM, MOV, MKV, AVI, GIF) becomes `frames` RGB frames.

Decoded with PyAV (FFmpeg's libraries; the optional extra `video`). A clip is the first `frames` frames
of the file resampled to `fps` (0: the file's own rate): target time k / fps takes the last frame shown
at that time, so a slower file repeats frames and a faster one drops them. A file that cannot be decoded,
or is shorter than the clip, raises `BadImage` with a short reason and is skipped like a broken image.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from personalize.data.decode import MAX_PIXELS, BadImage
from personalize.errors import UserError

VIDEO_SUFFIXES = {".mp4", ".m4v", ".webm", ".mov", ".mkv", ".avi", ".gif"}
INSTALL = "pip install 'personalize[video]'"


def is_video(path: Path) -> bool:
    return path.suffix.lower() in VIDEO_SUFFIXES


@dataclass
class Clip:
    frames: list[Image.Image]  # RGB, `frames` of them
    size: tuple[int, int]  # (h, w)


def _av() -> Any:
    try:
        import av
    except ImportError:
        raise UserError(f"training on video files needs PyAV: {INSTALL}") from None
    return av


def frame_times(times: list[float], frames: int, fps: float) -> list[int]:
    """Indices of the decoded frames (presentation times `times`, seconds, ascending) that make a clip of
    `frames` frames at `fps`: for target time k / fps, the last frame whose time is <= it (fps 0: the
    first `frames` frames). Fewer than `frames` indices when the file is too short."""
    if fps <= 0:
        return list(range(min(frames, len(times))))
    if not times:
        return []
    step = times[1] - times[0] if len(times) > 1 else 1.0 / fps
    end = times[-1] + step  # the last frame stays on screen for one frame interval
    chosen: list[int] = []
    index = 0
    for k in range(frames):
        target = times[0] + k / fps
        if target >= end - 1e-6:
            break
        while index + 1 < len(times) and times[index + 1] <= target + 1e-6:
            index += 1
        chosen.append(index)
    return chosen


def read_clip(data: bytes, frames: int, fps: float = 0.0, max_pixels: int = MAX_PIXELS) -> Clip:
    """Bytes of a video file -> a clip of `frames` RGB frames at `fps`; BadImage when that is impossible."""
    av = _av()
    if not data:
        raise BadImage("empty file")
    decoded: list[Any] = []
    times: list[float] = []
    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise BadImage("no video stream")
            stream = container.streams.video[0]
            if stream.width * stream.height > max_pixels:
                raise BadImage(f"too large: {stream.width}x{stream.height} pixels per frame")
            rate = float(stream.average_rate or fps or 16)
            horizon = (frames / fps if fps > 0 else frames / rate) + 1.0 / rate  # decode no further than needed
            for frame in container.decode(stream):
                time = float(frame.time) if frame.time is not None else len(times) / rate
                decoded.append(frame)
                times.append(time)
                if len(decoded) >= frames and time - times[0] >= horizon:
                    break
    except BadImage:
        raise
    except Exception as error:  # PyAV raises its own FFmpeg error types (InvalidDataError, ...)
        reason = getattr(error, "strerror", None) or str(error).splitlines()[0][:80] or type(error).__name__
        raise BadImage(f"not a decodable video ({reason})") from None
    chosen = frame_times(times, frames, fps)
    if len(chosen) < frames:
        at = f" at {fps:g} fps" if fps > 0 else ""
        raise BadImage(f"too short: {len(chosen)} of the {frames} frames{at} data.frames asks for")
    images: dict[int, Image.Image] = {}
    for index in chosen:
        if index not in images:
            images[index] = decoded[index].to_image().convert("RGB")
    clip = [images[index] for index in chosen]
    return Clip(clip, (clip[0].height, clip[0].width))
