"""What making the lighter copy of a large photo costs: prints seconds and peak memory.

    PYTHONPATH=. python bench/images.py [MEGAPIXELS...]

Each size runs in a fresh process (peak memory is per process, and a child starts with
its parent's): a photo-like JPEG of that many megapixels (4:3) is written, then
:func:`newsletter.images.published_file` makes its copy, once upright and once stored on
its side (EXIF orientation 6), as ``publish`` (or the first request to ``serve``) does.
"""

from __future__ import annotations

import multiprocessing
import resource
import sys
import tempfile
import time
from pathlib import Path

from PIL import Image


def photo(path: Path, megapixels: float, orientation: int) -> None:
    height = int((megapixels * 1e6 * 3 / 4) ** 0.5)
    width = height * 4 // 3
    gradient = Image.linear_gradient("L").resize((width, height))
    noise = Image.effect_noise((width, height), 30)
    exif = Image.Exif()
    exif[0x0112] = orientation
    picture = Image.merge("RGB", (gradient, noise, Image.blend(gradient, noise, 0.5)))
    picture.save(path, "JPEG", quality=90, exif=exif)


def copy(source: str, cache: str, queue: multiprocessing.Queue[tuple[float, float, str]]) -> None:
    from newsletter import images

    start = time.perf_counter()
    out = images.published_file(Path(source), Path(cache))
    elapsed = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with Image.open(out) as result:
        size = f"{result.width}x{result.height}"
    queue.put((elapsed, peak, size))


def main() -> None:
    sizes = [float(arg) for arg in sys.argv[1:]] or [12.0, 48.0]
    spawn = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as tmp:
        for megapixels in sizes:
            for orientation, label in ((1, "upright"), (6, "on its side")):
                source = Path(tmp) / f"{megapixels}-{orientation}.jpg"
                # Made in a child too: on Linux a child starts with its parent's peak.
                maker = spawn.Process(target=photo, args=(source, megapixels, orientation))
                maker.start()
                maker.join()
                queue: multiprocessing.Queue[tuple[float, float, str]] = spawn.Queue()
                child = spawn.Process(target=copy, args=(str(source), f"{tmp}/cache", queue))
                child.start()
                elapsed, peak, size = queue.get(timeout=600)
                child.join()
                print(
                    f"{megapixels:5.0f} MP JPEG, {label:<11} {source.stat().st_size / 1e6:5.1f} MB"
                    f" -> {size:<9} {elapsed:6.2f} s, peak {peak:5.0f} MB"
                )


if __name__ == "__main__":
    main()
