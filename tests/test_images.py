"""Images: their real size from Pillow, and the lighter copy made once for large ones."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
from PIL import Image

from newsletter import images
from newsletter.errors import ContentError


def write(path: Path, image: Image.Image, fmt: str, **options: object) -> Path:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    path.write_bytes(out.getvalue())
    return path


def photo(width: int, height: int) -> Image.Image:
    gradient = Image.linear_gradient("L").resize((width, height))
    noise = Image.effect_noise((width, height), 40)
    return Image.merge("RGB", (gradient, noise, Image.blend(gradient, noise, 0.5)))


def test_small_images_are_published_as_they_are(tmp_path: Path) -> None:
    narrow = write(tmp_path / "n.png", Image.new("RGB", (300, 200), "navy"), "PNG")
    found = images.info(narrow)
    assert (found.width, found.height, found.format) == (300, 200, "PNG")
    assert found.display_width == 300
    assert images.published_file(narrow, tmp_path / "cache") == narrow
    assert not (tmp_path / "cache").exists()


def test_a_large_photo_is_resized_and_recompressed_once(tmp_path: Path) -> None:
    source = write(tmp_path / "p.jpg", photo(3000, 2000), "JPEG", quality=95)
    before = source.read_bytes()
    assert images.info(source).display_width == images.COLUMN_WIDTH
    out = images.published_file(source, tmp_path / "cache")
    assert out != source and out.parent == tmp_path / "cache"
    with Image.open(out) as result:
        assert result.size == (images.MAX_WIDTH, 800) and result.format == "JPEG"
    assert out.stat().st_size <= images.MAX_BYTES < len(before)
    assert source.read_bytes() == before  # the original stays
    stamp = out.stat().st_mtime_ns
    assert images.published_file(source, tmp_path / "cache") == out
    assert out.stat().st_mtime_ns == stamp  # made once


def test_a_photo_saved_as_png_gets_a_palette_within_the_budget(tmp_path: Path) -> None:
    source = write(tmp_path / "p.png", photo(1000, 700), "PNG")
    assert source.stat().st_size > images.MAX_BYTES
    out = images.published_file(source, tmp_path / "cache")
    with Image.open(out) as result:
        assert result.format == "PNG" and result.mode == "P" and result.width == 1000
    assert out.stat().st_size < source.stat().st_size


def test_animations_are_left_alone_and_broken_files_are_one_clear_error(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (1500, 100), colour) for colour in ("red", "blue")]
    gif = tmp_path / "a.gif"
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:], duration=100)
    assert images.info(gif).animated
    assert images.published_file(gif, tmp_path / "cache") == gif
    broken = tmp_path / "b.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    with pytest.raises(ContentError, match="cannot read this image") as info:
        images.info(broken)
    assert info.value.where == str(broken)


def test_weight_adds_up_originals_and_what_readers_get(tmp_path: Path) -> None:
    small = write(tmp_path / "s.png", Image.new("RGB", (200, 100), "olive"), "PNG")
    large = write(tmp_path / "l.jpg", photo(2400, 1600), "JPEG", quality=95)
    estimate = images.weight([small, large, small])
    assert estimate.count == 2 and estimate.resized == 1
    assert estimate.original_bytes == small.stat().st_size + large.stat().st_size
    measured = images.weight([small, large], tmp_path / "cache")
    published = images.published_file(large, tmp_path / "cache").stat().st_size
    assert measured.published_bytes == small.stat().st_size + published
    assert "2 images" in measured.describe() and "1 resized" in measured.describe()
