"""An issue's images: their real size, and the lighter copy readers are sent to.

The email shows each image at its own width, never wider than the column
(:data:`COLUMN_WIDTH`), so a narrow image is not stretched. What is published
(the files behind the email's ``src`` and the archive page) is the original when
it is small enough, else a copy resized to :data:`MAX_WIDTH` pixels (enough for
2x screens) and recompressed under :data:`MAX_BYTES`, made once with Pillow and
kept under ``.newsletter/publish/images/``. The original stays in the issue folder.

A camera writes where and when a photo was taken (EXIF GPS), and editors' tools
add comments and XMP: an image that carries any of it gets a copy without it,
whatever its size, so the web never shows what the editor's phone knew. Only
the formats browsers show are read (PNG, JPEG, GIF, WebP; a phone's multi-picture
JPEG is read as its first picture), never Pillow's other decoders.
"""

from __future__ import annotations

import hashlib
import io
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ContentError
from .files import atomic_write_bytes

COLUMN_WIDTH = 552  # the email's content column, in CSS pixels
MAX_WIDTH = 1200  # published images are at most this wide (2x a phone, ~2x the column)
MAX_BYTES = 300_000  # and, where recompressing can manage it, at most this heavy
_JPEG_QUALITIES = (85, 78, 70, 62, 55, 48, 40)
# In the copies' names: copies made before version 2 could keep a comment, so are made again.
_COPY_VERSION = 2
_ORIENTATION = 0x0112  # the EXIF tag saying which way up the camera was held
_FORMATS = {"PNG": ".png", "JPEG": ".jpg", "GIF": ".gif", "WEBP": ".webp"}
# What Pillow may open: the formats above (its JPEG reader also opens MPO, the JPEG a
# phone writes with a depth map or preview after the picture: read as its first picture).
_READABLE = ("PNG", "JPEG", "GIF", "WEBP")
# Header fields that say how to show the pixels, and nothing about who or where.
_PLAIN_INFO = frozenset(
    {
        "adobe",
        "adobe_transform",
        "aspect",
        "background",
        "chromaticity",
        "default_image",
        "disposal",
        "blend",
        "bbox",
        "dpi",
        "duration",
        "gamma",
        "icc_profile",
        "interlace",
        "jfif",
        "jfif_density",
        "jfif_unit",
        "jfif_version",
        "loop",
        "progression",
        "progressive",
        "srgb",
        "timestamp",
        "transparency",
        "version",
    }
)


@dataclass(frozen=True)
class ImageInfo:
    """What Pillow reads from an image's header (no pixels are decoded)."""

    width: int
    height: int
    format: str  # PNG, JPEG, GIF or WEBP
    size: int  # bytes on disk
    animated: bool = False
    metadata: bool = False  # EXIF (GPS, camera), XMP, IPTC, comments or text
    # Has see-through pixels: on a client's dark ground its dark lines can vanish.
    transparent: bool = False

    @property
    def display_width(self) -> int:
        """The width to show it at in the email: its own, at most the column's."""
        return min(self.width, COLUMN_WIDTH)


_info_cache: dict[tuple[str, int, int], ImageInfo] = {}
_lock = threading.Lock()


def info(path: Path) -> ImageInfo:
    """Width, height, format and size of one image; a file Pillow cannot read is an error."""
    try:
        stat = path.stat()
    except OSError:
        raise ContentError("image not found", where=str(path), hint="check the path") from None
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    with _lock:
        cached = _info_cache.get(key)
    if cached is not None:
        return cached
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path, formats=_READABLE) as image:
            multi_picture = image.format == "MPO"
            width, height = int(image.width), int(image.height)
            if "exif" in image.info and image.getexif().get(_ORIENTATION, 1) in (5, 6, 7, 8):
                width, height = height, width  # shown (and published) turned a quarter
            found = ImageInfo(
                width=width,
                height=height,
                format="JPEG" if multi_picture else str(image.format or ""),
                size=stat.st_size,
                animated=not multi_picture and bool(getattr(image, "is_animated", False)),
                metadata=multi_picture or _has_metadata(image),
                transparent=image.mode in ("RGBA", "LA", "PA", "RGBa", "La")
                or "transparency" in image.info,
            )
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as exc:
        raise ContentError(
            f"cannot read this image ({exc})",
            where=str(path),
            hint="export it again as PNG, JPEG, GIF or WebP",
        ) from None
    with _lock:
        if len(_info_cache) > 1024:
            _info_cache.clear()
        _info_cache[key] = found
    return found


def _has_metadata(image: Any) -> bool:
    """Whether the file says more than its pixels (read from the header, no decoding)."""
    if set(image.info) - _PLAIN_INFO:
        return True
    # JPEG segments Pillow keeps no field for (extended XMP, C2PA, maker data...):
    # only JFIF, the colour profile and Adobe's colour flag are plain.
    return any(
        marker not in ("APP0", "APP14") and not (marker == "APP2" and data[:12] == b"ICC_PROFILE\0")
        for marker, data in getattr(image, "applist", ())
    )


def needs_optimising(found: ImageInfo) -> bool:
    """Too wide or too heavy to send readers as it is, or carrying metadata (animations
    are left alone)."""
    return not found.animated and (
        found.width > MAX_WIDTH or found.size > MAX_BYTES or found.metadata
    )


def published_file(source: Path, cache_dir: Path) -> Path:
    """The file readers get for ``source``: itself, or its resized copy (made once).

    The copy is named after the original's content, so editing the image makes a
    new one and an unchanged image is never processed twice.
    """
    found = info(source)
    if not needs_optimising(found):
        return source
    data = source.read_bytes()
    digest = hashlib.sha256(data).hexdigest()[:20]
    name = f"{digest}-w{MAX_WIDTH}-b{MAX_BYTES}-v{_COPY_VERSION}{_FORMATS.get(found.format, '')}"
    target = cache_dir / name
    if target.is_file():
        return target
    smaller = _recompress(data, found, source)
    if smaller is None or (len(smaller) >= found.size and not found.metadata):
        return source  # nothing gained: readers get the original
    atomic_write_bytes(target, smaller)
    return target


def _recompress(data: bytes, found: ImageInfo, source: Path) -> bytes | None:
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(data), formats=_READABLE) as opened:
            if found.format == "JPEG" and found.width > MAX_WIDTH:
                # Decode at 1/2, 1/4 or 1/8 scale, still at least MAX_WIDTH wide: a 48 MP
                # photo then takes a sixteenth of the memory and time.
                upright = found.width == opened.width
                opened.draft(None, (MAX_WIDTH, 1) if upright else (1, MAX_WIDTH))
            image: Any = ImageOps.exif_transpose(opened) or opened
            image.load()
    except (OSError, Image.DecompressionBombError) as exc:
        raise ContentError(
            f"cannot read this image ({exc})", where=str(source), hint="export it again"
        ) from None
    # The copy keeps how to show the pixels (the colour profile among it), nothing else.
    image.info = {key: value for key, value in image.info.items() if key in _PLAIN_INFO}
    if image.width > MAX_WIDTH:
        height = max(1, round(image.height * MAX_WIDTH / image.width))
        image = image.resize((MAX_WIDTH, height), Image.Resampling.LANCZOS)
    if found.format == "JPEG":
        if image.mode not in ("RGB", "L"):
            image = image.convert("RGB")
        return _smallest(image, "JPEG", {"optimize": True, "progressive": True})
    if found.format == "WEBP":
        return _smallest(image, "WEBP", {"method": 6})
    if found.format == "GIF":
        return _save(image, "GIF", {"optimize": True})
    encoded = _save(image, "PNG", {"optimize": True})
    if len(encoded) > MAX_BYTES and image.mode not in ("P", "L", "1"):
        # A photo saved as PNG: 256 colours keep it sharp enough and far lighter.
        palette = image.convert("RGBA" if "A" in image.getbands() else "RGB").quantize(
            256, method=Image.Quantize.FASTOCTREE
        )
        encoded = min(encoded, _save(palette, "PNG", {"optimize": True}), key=len)
    return encoded


def _smallest(image: Any, fmt: str, options: dict[str, Any]) -> bytes:
    """The best quality that fits the byte budget, else the lowest tried."""
    encoded = b""
    for quality in _JPEG_QUALITIES:
        encoded = _save(image, fmt, {**options, "quality": quality})
        if len(encoded) <= MAX_BYTES:
            break
    return encoded


def _save(image: Any, fmt: str, options: dict[str, Any]) -> bytes:
    out = io.BytesIO()
    profile = image.info.get("icc_profile")
    if profile and fmt in ("JPEG", "WEBP"):  # PNG takes it from info, these do not
        options = {**options, "icc_profile": profile}
    image.save(out, fmt, **options)
    return out.getvalue()


@dataclass(frozen=True)
class ImageWeight:
    """How heavy an issue's images are: as in the folder, and as readers get them."""

    count: int
    original_bytes: int
    published_bytes: int
    resized: int  # images that get a lighter copy
    estimated: bool = False  # published_bytes counts large images as the byte budget

    def describe(self) -> str:
        text = f"{self.count} images, {self.original_bytes / 1024:.0f} KB"
        if self.resized:
            about = "at most " if self.estimated else ""
            text += (
                f" ({about}{self.published_bytes / 1024:.0f} KB as published: {self.resized}"
                f" resized to at most {MAX_WIDTH} px wide)"
            )
        return text


def weight(sources: Iterable[Path], cache_dir: Path | None = None) -> ImageWeight:
    """The total weight of ``sources``, and what readers get once the large ones are resized.

    With ``cache_dir`` the lighter copies are made (once) and measured; without, a
    large image counts as the byte budget.
    """
    count = original = published = resized = 0
    for source in dict.fromkeys(sources):
        found = info(source)
        count += 1
        original += found.size
        if not needs_optimising(found):
            published += found.size
        elif cache_dir is None:
            resized += 1
            published += min(found.size, MAX_BYTES)
        else:
            served = published_file(source, cache_dir)
            resized += served != source
            published += served.stat().st_size
    return ImageWeight(count, original, published, resized, estimated=cache_dir is None)
