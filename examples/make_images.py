"""Regenerate the example images with nothing but the standard library.

Run from the repository root:  python examples/make_images.py

Every picture is flat colours and simple shapes, so each PNG stays small.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

RGB = tuple[int, int, int]

SKY = (198, 226, 240)
SEA = (52, 116, 156)
SEA_DARK = (36, 88, 124)
SAND = (236, 220, 186)
STONE = (176, 170, 160)
GRASS = (120, 170, 110)
TREE = (64, 122, 80)
WHITE = (250, 250, 246)
INK = (40, 44, 52)
RED = (206, 72, 60)
YELLOW = (240, 196, 72)
TEAL = (42, 150, 140)
WOOD = (150, 100, 60)
PAPER = (244, 236, 214)
PAPER_LINE = (196, 170, 128)


class Canvas:
    def __init__(self, width: int, height: int, fill: RGB) -> None:
        self.width = width
        self.height = height
        self.rows = [bytearray(bytes(fill) * width) for _ in range(height)]

    def rect(self, x0: int, y0: int, x1: int, y1: int, colour: RGB) -> None:
        x0, x1 = max(0, x0), min(self.width, x1)
        y0, y1 = max(0, y0), min(self.height, y1)
        if x0 >= x1:
            return
        span = bytes(colour) * (x1 - x0)
        for y in range(y0, y1):
            self.rows[y][x0 * 3 : x1 * 3] = span

    def circle(self, cx: int, cy: int, r: int, colour: RGB) -> None:
        for y in range(max(0, cy - r), min(self.height, cy + r + 1)):
            dy = y - cy
            half = int((r * r - dy * dy) ** 0.5)
            self.rect(cx - half, y, cx + half + 1, y + 1, colour)

    def png(self) -> bytes:
        raw = b"".join(b"\x00" + bytes(row) for row in self.rows)

        def chunk(kind: bytes, data: bytes) -> bytes:
            body = kind + data
            return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)
        return (
            b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(raw, 9))
            + chunk(b"IEND", b"")
        )


def tram() -> Canvas:
    c = Canvas(600, 300, SKY)
    c.rect(0, 230, 600, 300, STONE)
    c.rect(0, 250, 600, 254, INK)
    c.rect(0, 270, 600, 274, INK)
    c.rect(90, 130, 510, 240, YELLOW)
    c.rect(90, 220, 510, 232, RED)
    for x in range(110, 500, 70):
        c.rect(x, 148, x + 50, 190, WHITE)
    c.rect(296, 40, 300, 130, INK)
    c.rect(0, 38, 600, 42, INK)
    for x in (150, 230, 370, 450):
        c.circle(x, 240, 12, INK)
    return c


def ferry() -> Canvas:
    c = Canvas(600, 300, SKY)
    c.circle(500, 70, 36, YELLOW)
    c.rect(0, 190, 600, 300, SEA)
    for y in range(210, 300, 24):
        c.rect(0, y, 600, y + 4, SEA_DARK)
    c.rect(150, 150, 450, 200, WHITE)
    c.rect(130, 196, 470, 214, RED)
    c.rect(210, 110, 390, 150, WHITE)
    for x in range(222, 380, 36):
        c.rect(x, 120, x + 22, 138, SEA_DARK)
    c.rect(290, 76, 310, 110, INK)
    c.rect(0, 160, 80, 200, STONE)
    c.rect(520, 160, 600, 200, STONE)
    return c


def promenade_map() -> Canvas:
    c = Canvas(600, 300, PAPER)
    c.rect(0, 120, 600, 180, (150, 190, 210))
    c.rect(0, 112, 600, 120, PAPER_LINE)
    for x in range(20, 600, 80):
        c.rect(x, 60, x + 50, 100, PAPER_LINE)
        c.rect(x + 10, 200, x + 60, 250, PAPER_LINE)
    c.rect(0, 0, 600, 6, INK)
    c.rect(0, 294, 600, 300, INK)
    c.rect(0, 0, 6, 300, INK)
    c.rect(594, 0, 600, 300, INK)
    return c


def promenade_today() -> Canvas:
    c = Canvas(600, 300, SKY)
    c.rect(0, 200, 600, 300, SEA)
    c.rect(0, 150, 600, 200, SAND)
    c.rect(0, 196, 600, 202, STONE)
    for x in range(40, 600, 110):
        c.rect(x + 18, 95, x + 26, 150, WOOD)
        c.circle(x + 22, 90, 30, TREE)
    for x in range(90, 600, 110):
        c.rect(x, 168, x + 36, 174, WOOD)
    c.circle(330, 160, 6, RED)
    c.rect(326, 166, 334, 190, RED)
    return c


def bench() -> Canvas:
    c = Canvas(600, 300, (226, 236, 226))
    c.rect(0, 230, 600, 300, GRASS)
    c.rect(150, 130, 450, 146, WOOD)
    c.rect(150, 154, 450, 170, WOOD)
    c.rect(140, 190, 460, 206, WOOD)
    c.rect(170, 130, 182, 260, INK)
    c.rect(418, 130, 430, 260, INK)
    c.rect(140, 176, 152, 204, INK)
    c.rect(448, 176, 460, 204, INK)
    c.circle(520, 110, 50, TREE)
    c.rect(514, 150, 526, 240, WOOD)
    return c


def card(colour: RGB, accent: RGB) -> Canvas:
    c = Canvas(320, 160, colour)
    c.rect(20, 20, 300, 40, accent)
    c.rect(20, 60, 240, 72, WHITE)
    c.rect(20, 84, 270, 96, WHITE)
    c.rect(20, 108, 200, 120, WHITE)
    return c


def main() -> None:
    root = Path(__file__).resolve().parent.parent
    issue_images = root / "issues" / "001-trams-ferries-benches" / "images"
    examples = root / "examples"
    outputs = {
        issue_images / "harbour-tram.png": tram(),
        issue_images / "ferry-quay.png": ferry(),
        issue_images / "promenade-1894-map.png": promenade_map(),
        issue_images / "promenade-today.png": promenade_today(),
        issue_images / "bench.png": bench(),
        examples / "1.png": card(TEAL, YELLOW),
        examples / "2.png": card(SEA, WHITE),
        examples / "3.png": card(RED, PAPER),
    }
    for path, canvas in outputs.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(canvas.png())
        print(f"{path.relative_to(root)}  {path.stat().st_size} bytes")


if __name__ == "__main__":
    main()
