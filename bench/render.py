"""Render speed: warm library render of the example issue, and a cold `newsletter build`.

Usage: PYTHONPATH=. python bench/render.py [--runs N] [--cold-runs N] [--profile]

Goals (issue 2): <= 20 ms warm, <= 0.6 s cold on a 2-core machine. Figures are
printed, never asserted; the goals are shown beside them.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import io
import os
import pstats
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from newsletter import config, content, render  # noqa: E402

WARM_GOAL_MS = 20.0
COLD_GOAL_S = 0.6


def copy_workspace(target: Path) -> Path:
    target.mkdir(parents=True)
    shutil.copy2(REPO / config.CONFIG_NAME, target / config.CONFIG_NAME)
    shutil.copytree(REPO / "issues", target / "issues")
    (target / "templates").mkdir()
    return target


def timed(func: Callable[[], object], runs: int) -> list[float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        func()
        times.append(time.perf_counter() - start)
    return times


def describe(times: list[float], scale: float, unit: str) -> str:
    ordered = sorted(times)
    return (
        f"median {statistics.median(ordered) * scale:.1f} {unit} "
        f"(min {ordered[0] * scale:.1f}, max {ordered[-1] * scale:.1f}, n={len(ordered)})"
    )


CPU_TIMES: dict[str, list[float]] = {}


def cold(args: list[str], runs: int, cwd: Path) -> list[float]:
    """Wall times of fresh processes; their CPU times (user+sys, less sensitive to
    other load on the machine) go to CPU_TIMES under the command line."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
    env["PYTHONPATH"] = str(REPO)
    env["NEWSLETTER_SECRET_KEY"] = "bench-secret-key-0123456789"
    times, cpu = [], []
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "newsletter", *args],
            cwd=cwd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        times.append(time.perf_counter() - start)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    CPU_TIMES[" ".join(args)] = cpu
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30, help="warm renders (default 30)")
    parser.add_argument("--cold-runs", type=int, default=5, help="fresh processes (default 5)")
    parser.add_argument("--profile", action="store_true", help="print where warm time goes")
    options = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        workspace = copy_workspace(Path(tmp) / "ws")
        cfg = config.load(workspace, environ={})
        issue = content.read_issue(content.find_issue(cfg.issues_dir, "1"))
        body_kb = sum(len(a.body.encode()) for a in issue.articles) / 1024
        file_kb = sum(a.path.stat().st_size for a in issue.articles) / 1024
        print(f"issue: {issue.slug}, {len(issue.articles)} articles, "
              f"{body_kb:.1f} KB of article text ({file_kb:.1f} KB with front matter), "
              f"{sum(a.word_count for a in issue.articles)} words")  # fmt: skip

        first = timed(lambda: render.render_issue(issue, cfg), 1)[0]
        rendered = render.render_issue(issue, cfg)
        print(f"output: email HTML {rendered.html_size / 1024:.1f} KB, "
              f"text {len(rendered.text.encode()) / 1024:.1f} KB, "
              f"web {len(rendered.web_html.encode()) / 1024:.1f} KB")  # fmt: skip
        print(f"first render in this process: {first * 1000:.1f} ms")
        warm = timed(lambda: render.render_issue(issue, cfg), options.runs)
        verdict = "meets" if statistics.median(warm) * 1000 <= WARM_GOAL_MS else "MISSES"
        print(
            f"warm render_issue: {describe(warm, 1000, 'ms')}  "
            f"goal <= {WARM_GOAL_MS:.0f} ms: {verdict}"
        )
        # The same, but every article's text differs each run, so no Markdown is reused
        # (what a render of a newly edited issue costs in a warm process).
        fresh = []
        for n in range(options.runs):
            edited = dataclasses.replace(
                issue,
                articles=tuple(
                    dataclasses.replace(a, body=f"{a.body}\n\nEdit {n}.\n") for a in issue.articles
                ),
            )
            start = time.perf_counter()
            render.render_issue(edited, cfg)
            fresh.append(time.perf_counter() - start)
        verdict = "meets" if statistics.median(fresh) * 1000 <= WARM_GOAL_MS else "MISSES"
        print(
            f"warm render_issue, all Markdown new: {describe(fresh, 1000, 'ms')}  "
            f"goal <= {WARM_GOAL_MS:.0f} ms: {verdict}"
        )

        build = cold(["-C", str(workspace), "build", "1"], options.cold_runs, workspace)
        verdict = "meets" if statistics.median(build) <= COLD_GOAL_S else "MISSES"
        print(
            f"cold `newsletter build 1`: {describe(build, 1000, 'ms')}  "
            f"goal <= {COLD_GOAL_S * 1000:.0f} ms: {verdict}"
        )
        cpu = CPU_TIMES[" ".join(["-C", str(workspace), "build", "1"])]
        print(f"   its CPU time (user+sys): {describe(cpu, 1000, 'ms')}")
        helps = cold(["--help"], options.cold_runs, Path(tmp))
        print(f"cold `newsletter --help`: {describe(helps, 1000, 'ms')}")
        print(f"   its CPU time (user+sys): {describe(CPU_TIMES['--help'], 1000, 'ms')}")
        print(
            f"load average: {' '.join(f'{x:.2f}' for x in os.getloadavg())} "
            f"on {os.cpu_count()} cores"
        )
        bare = cold(["--version"], 1, Path(tmp))  # warms the OS cache for the next line
        python_only = timed(
            lambda: subprocess.run([sys.executable, "-c", "pass"], check=True), options.cold_runs
        )
        del bare
        print(f"cold bare `python -c pass`: {describe(python_only, 1000, 'ms')}")

        if options.profile:
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(10):
                render.render_issue(issue, cfg)
            profiler.disable()
            out = io.StringIO()
            stats = pstats.Stats(profiler, stream=out)
            stats.sort_stats("cumulative").print_stats(25)
            print(out.getvalue())


if __name__ == "__main__":
    main()
