"""What the web UI lets in: paths inside the root only, image uploads only, sanitized names, a size limit.

Everything the UI reads or writes goes through `inside_root`; uploads through `accept_upload`, which
checks the size, decodes the file with the intake's own decoder (so "not an image" means exactly what
training would say), and stores it under a sanitized name in the run's folder.
"""

from __future__ import annotations

import re
import shutil
import unicodedata
from pathlib import Path

from personalize.errors import UserError

MAX_UPLOAD_BYTES = 25 * 1024 * 1024  # a 24-megapixel JPEG is ~10 MB; anything larger is not a photo
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".heic", ".heif", ".avif"}
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def inside_root(root: Path, path: str | Path) -> Path:
    """`path` (absolute, or relative to root) resolved, symlinks followed; UserError when it leaves root."""
    root = Path(root).resolve()
    candidate = Path(path).expanduser()
    resolved = (candidate if candidate.is_absolute() else root / candidate).resolve()
    if resolved != root and root not in resolved.parents:
        raise UserError(f"{path} is outside the UI's root {root}; choose a path inside it (or start with --root)")
    return resolved


def safe_name(name: str, fallback: str = "file") -> str:
    """A file or folder name with no directory part, no leading dots and only [A-Za-z0-9._-]."""
    base = re.split(r"[\\/]", name)[-1]  # a browser may send "C:\\photos\\a.jpg" or "../../a.jpg"
    base = unicodedata.normalize("NFKD", base).encode("ascii", "ignore").decode()
    base = _UNSAFE.sub("_", base).strip("._-")
    return base[:120] or fallback


def check_upload(path: Path, name: str) -> str | None:
    """The reason an uploaded file is refused, or None when it is a usable image."""
    from personalize.data.decode import BadImage, decode, parse_color, read_bytes

    if Path(name).suffix.lower() not in IMAGE_SUFFIXES:
        return f"not an image file ({Path(name).suffix or 'no extension'}); upload JPEG, PNG or WebP photos"
    size = path.stat().st_size
    if size > MAX_UPLOAD_BYTES:
        return f"too large ({size / 2**20:.0f} MB, the limit is {MAX_UPLOAD_BYTES // 2**20} MB)"
    try:
        decode(read_bytes(path), parse_color("white"), draft=(1, 1))
    except BadImage as error:
        return str(error)
    return None


def accept_upload(source: Path, name: str, folder: Path) -> tuple[Path | None, str | None]:
    """Copy one uploaded file into `folder` under a sanitized, unused name: (stored path, None) or
    (None, reason it was refused)."""
    reason = check_upload(source, name)
    if reason is not None:
        return None, reason
    folder.mkdir(parents=True, exist_ok=True)
    clean = safe_name(name, "image")
    stem, suffix = Path(clean).stem or "image", Path(clean).suffix.lower()
    target, number = folder / f"{stem}{suffix}", 1
    while target.exists():
        number += 1
        target = folder / f"{stem}-{number}{suffix}"
    shutil.copyfile(source, target)
    return target, None
