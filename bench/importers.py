"""How long article import takes: extraction per page, fetch + extract, digest split, CLI.

Run from the repo root:  PYTHONPATH=. python bench/importers.py
Prints figures; asserts nothing. Everything is served from 127.0.0.1.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).parents[1]
sys.path.insert(0, str(ROOT))

from newsletter.importers import draft, web  # noqa: E402
from tests.support.importers import make_workspace  # noqa: E402
from tests.support.local_http import HTML, LocalServer, Reply  # noqa: E402
from tests.support.web_pages import bare_page, blog_post, news_article  # noqa: E402


def timed(func: Callable[[], object], runs: int) -> tuple[float, float]:
    """Median and max milliseconds of ``runs`` calls (after one warm-up call)."""
    func()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        func()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times), max(times)


def long_article(paragraphs: int) -> str:
    """The news page with its body grown to ``paragraphs`` paragraphs (about 40 words each)."""
    extra = "".join(
        f"<p>Paragraph {n}: the harbour board heard from ferry crews, cafe owners and "
        "commuters about how a timetable that repeats every twenty minutes changes the "
        "way people plan their mornings, and what it costs to run in winter.</p>"
        for n in range(paragraphs)
    )
    return news_article().replace("<p>Operators have asked", f"{extra}<p>Operators have asked")


def main() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import trafilatura"], check=True, env=env)
    with_traf = (time.perf_counter() - start) * 1000
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import newsletter.cli"], check=True, env=env)
    cli_only = (time.perf_counter() - start) * 1000
    print(
        f"python + import trafilatura: {with_traf:.0f} ms; python + import newsletter.cli: "
        f"{cli_only:.0f} ms (trafilatura is imported lazily)"
    )

    pages = {
        "news page (7 paragraphs)": news_article(),
        "blog post (JSON-LD only)": blog_post(),
        "bare page (no metadata)": bare_page(),
        "long page (300 paragraphs)": long_article(300),
    }
    for name, page in pages.items():
        size = len(page.encode()) / 1024
        median, worst = timed(lambda p=page: web.extract(p, "https://news.example.org/x"), 20)
        words = web.extract(page, "https://news.example.org/x").word_count
        print(
            f"extract {name:<28} {size:7.1f} KB {words:6d} words: "
            f"median {median:6.1f} ms, max {worst:6.1f} ms"
        )

    server = LocalServer()
    try:
        server.routes["/story"] = Reply(body=news_article().encode(), headers=HTML)
        with tempfile.TemporaryDirectory() as tmp:
            cfg = make_workspace(Path(tmp) / "ws")
            median, worst = timed(lambda: web.import_url(server.url("/story"), cfg), 20)
            print(
                "fetch + extract from 127.0.0.1 (news page): "
                f"median {median:.1f} ms, max {worst:.1f} ms"
            )
            start = time.perf_counter()
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "newsletter",
                    "-C",
                    str(cfg.root),
                    "issue",
                    "add",
                    "1",
                    server.url("/story"),
                ],
                check=True,
                env=env,
                capture_output=True,
            )
            print(
                f"`newsletter issue add 1 URL` end to end (new process): "
                f"{(time.perf_counter() - start) * 1000:.0f} ms"
            )
    finally:
        server.close()

    example = ROOT / "examples" / "digest.txt"
    median, worst = timed(lambda: draft.split_digest(example), 50)
    print(
        f"split examples/digest.txt ({example.stat().st_size / 1024:.1f} KB, 3 articles): "
        f"median {median:.2f} ms"
    )
    with tempfile.TemporaryDirectory() as tmp:
        big = Path(tmp) / "big.txt"
        pieces = [
            f"Headline number {n}\n\nBy Writer {chr(65 + n % 26)}, Paper {n}, 3/{n % 28 + 1}/25\n\n"
            + "\n\n".join(
                f"Paragraph {p} of piece {n} says something about harbours." for p in range(20)
            )
            for n in range(50)
        ]
        big.write_text(
            "Lead | Second\n\n" + "\n\n".join(pieces) + "\n\nA tagline\n", encoding="utf-8"
        )
        median, worst = timed(lambda: draft.split_digest(big), 10)
        print(
            f"split a 50-article digest ({big.stat().st_size / 1024:.0f} KB): "
            f"median {median:.1f} ms"
        )


if __name__ == "__main__":
    main()
