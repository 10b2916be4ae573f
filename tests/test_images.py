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


# --- what a published image tells about the editor ------------------------------------------

SECRET = b"12 Quay Lane, back garden"
XMP = (
    b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF'
    b' xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description'
    b' xmlns:exif="http://ns.adobe.com/exif/1.0/" exif:GPSLatitude="50,47.9N"/>'
    b"</rdf:RDF></x:xmpmeta>"
)


def camera_exif(orientation: int = 1) -> Image.Exif:
    """What a phone writes: make, model, where (GPS) and which way up."""
    exif = Image.Exif()
    exif[0x010F] = "PhoneMaker"
    exif[0x0110] = "Pocket 12"
    exif[0x0112] = orientation
    exif[0x8825] = {1: "N", 2: (50.0, 47.0, 54.0), 3: "W", 4: (1.0, 5.0, 30.0)}
    return exif


def srgb_profile() -> bytes:
    from PIL import ImageCms

    profile: bytes = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    return profile


def assert_says_nothing(path: Path) -> None:
    data = path.read_bytes()
    assert SECRET not in data and b"GPSLatitude" not in data and b"PhoneMaker" not in data
    with Image.open(path) as image:
        exif = image.getexif()
        assert not exif.get_ifd(0x8825) and 0x010F not in exif, dict(exif)
        assert not {"exif", "xmp", "comment"} & image.info.keys(), image.info.keys()


def test_published_images_carry_no_gps_comment_or_xmp_whatever_their_size(
    tmp_path: Path,
) -> None:
    from PIL import PngImagePlugin

    cache = tmp_path / "cache"
    # A small phone photo, on its side (orientation 6), with GPS, a comment and XMP.
    small = write(
        tmp_path / "small.jpg",
        photo(480, 320),
        "JPEG",
        quality=60,
        exif=camera_exif(orientation=6),
        comment=SECRET,
        xmp=XMP,
        icc_profile=srgb_profile(),
    )
    assert small.stat().st_size < images.MAX_BYTES
    assert images.info(small).width == 320  # the email shows it at its width upright
    out = images.published_file(small, cache)
    assert out != small
    assert_says_nothing(out)
    with Image.open(out) as result:
        assert result.size == (320, 480)  # turned the right way up, as the tag said
        assert result.info.get("icc_profile") == srgb_profile()  # the colours stay
    # A large one's resized copy drops its comment too (Pillow would carry it over), and
    # one stored on its side comes out upright, at the full width (decoded at a reduced
    # scale, never below it).
    large = write(tmp_path / "large.jpg", photo(2400, 1600), "JPEG", comment=SECRET, xmp=XMP)
    assert_says_nothing(images.published_file(large, cache))
    side = write(tmp_path / "side.jpg", photo(4000, 3000), "JPEG", exif=camera_exif(6))
    assert images.info(side).width == 3000
    with Image.open(images.published_file(side, cache)) as upright:
        assert upright.size == (images.MAX_WIDTH, 1600)
    # A PNG screenshot with text chunks and EXIF, and a GIF with a comment.
    text = PngImagePlugin.PngInfo()
    text.add_text("Comment", SECRET.decode())
    png = write(
        tmp_path / "shot.png",
        Image.new("RGB", (300, 200), "teal"),
        "PNG",
        pnginfo=text,
        exif=camera_exif(),
    )
    assert_says_nothing(images.published_file(png, cache))
    gif = write(tmp_path / "rule.gif", Image.new("P", (1500, 20)), "GIF", comment=SECRET)
    assert_says_nothing(images.published_file(gif, cache))
    # An image with nothing to hide is still published as it is.
    plain = write(tmp_path / "plain.jpg", photo(300, 200), "JPEG", quality=70)
    assert images.published_file(plain, cache) == plain


def test_a_phones_multi_picture_jpeg_is_published_as_a_resized_jpeg(tmp_path: Path) -> None:
    """Phones write MPO files (a JPEG, then a depth map or preview): not an animation."""
    source = tmp_path / "phone.jpg"
    photo(2000, 1500).save(
        source, "MPO", save_all=True, append_images=[photo(2000, 1500)], exif=camera_exif()
    )
    found = images.info(source)
    assert (found.format, found.animated) == ("JPEG", False)
    out = images.published_file(source, tmp_path / "cache")
    assert out.suffix == ".jpg"
    with Image.open(out) as result:
        assert (result.format, result.width) == ("JPEG", images.MAX_WIDTH)
        assert not getattr(result, "is_animated", False)
    assert out.stat().st_size <= images.MAX_BYTES
    assert_says_nothing(out)


@pytest.mark.parametrize("fmt", ["TIFF", "BMP", "PCX", "ICO"])
def test_only_formats_a_browser_shows_are_read(tmp_path: Path, fmt: str) -> None:
    disguised = write(tmp_path / "photo.png", Image.new("RGB", (64, 64), "red"), fmt)
    with pytest.raises(ContentError, match="cannot read this image") as info:
        images.info(disguised)
    assert "PNG, JPEG, GIF or WebP" in (info.value.hint or "")
