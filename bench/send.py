"""End-to-end send speed: the example issue to N generated subscribers through a local sink.

    PYTHONPATH=. python bench/send.py [--subscribers 10000] [--connections 4 8]
                                      [--rss-subscribers 100000] [--mailmerge 500]

The sink is `newsletter smtp-sink --count-only` in its own process (it only counts,
so the disk is not the bottleneck). Each measured send runs in a fresh client
process with the ledger on (a real SQLite file, durable claims): it imports the
generated list, renders the issue, then times `prepare_send(...).run()` alone, and reports
msgs/s, its CPU (getrusage self + children) and its peak RSS. The issue's goals on
this 2-core machine: >= 1,500 msgs/s, and peak RSS <= 120 MiB at 100,000 subscribers.

If mailmerge is installed (`pip install '.[bench]'`), the same message goes to a
smaller list through mailmerge's own CLI and the same sink, for a side-by-side ratio.
Use `--profile FILE` to write a cProfile of one client send.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SECRET = "bench-secret-key-0123456789abcdef"
ISSUE = "1"


def make_workspace(root: Path, port: int) -> Path:
    """A copy of the example workspace whose [smtp] points at the sink."""
    root.mkdir(parents=True, exist_ok=True)
    text = (REPO / "newsletter.toml").read_text(encoding="utf-8")
    text = re.sub(r"(?m)^port = \d+$", f"port = {port}", text)
    (root / "newsletter.toml").write_text(text, encoding="utf-8")
    shutil.copytree(REPO / "issues", root / "issues")
    return root


def write_list(path: Path, count: int) -> Path:
    with path.open("w", encoding="utf-8") as out:
        out.write("email,name,city\n")
        out.writelines(f"reader{i}@example.com,Reader {i},Port Example\n" for i in range(count))
    return path


# --------------------------------------------------------------------------- the sink


class Sink:
    """`newsletter smtp-sink --count-only` in a child process."""

    def __init__(self, folder: Path) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "newsletter", "smtp-sink", "--count-only", "-q", "--port", "0"],
            cwd=folder,
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        match = re.search(r"listening on [\d.]+:(\d+)", line)
        if match is None:
            self.proc.kill()
            raise SystemExit(f"the sink did not start: {line!r}")
        self.port = int(match.group(1))

    def stop(self) -> tuple[int, float]:
        """Stop it; (messages it received, CPU seconds it used)."""
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        self.proc.send_signal(signal.SIGINT)
        out, _ = self.proc.communicate(timeout=30)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        match = re.search(r"stopped after (\d+) messages", out)
        cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        return (int(match.group(1)) if match else -1), cpu


# --------------------------------------------------------------------------- one client run


def client(args: argparse.Namespace) -> None:
    """Runs in its own process: import, render, then time the send; prints one JSON line."""
    from newsletter import config, content, delivery, render
    from newsletter.models import DeliveryState
    from newsletter.store import Store

    ws = Path(args.workspace)
    cfg = config.load(ws, environ={config.ENV_SECRET_KEY: SECRET}, db=ws / "bench.db")
    cfg = dataclasses.replace(
        cfg, delivery=dataclasses.replace(cfg.delivery, connections=args.client_connections)
    )
    rendered = render.render_issue(
        content.read_issue(content.find_issue(cfg.issues_dir, ISSUE)), cfg
    )
    if args.dkim:
        from newsletter import dkim

        pair = dkim.generate(ws / "dkim", "bench", cfg.sender_domain)
        cfg = dataclasses.replace(
            cfg,
            dkim=dataclasses.replace(
                cfg.dkim,
                selector="bench",
                domain=cfg.sender_domain,
                key_file=str(pair.private_path),
            ),
        )
    with Store.open(cfg.database, durable_claims=not args.no_fsync) as store:
        store.import_csv(write_list(ws / "list.csv", args.client_subscribers))
        cpu0 = _cpu()
        start = time.perf_counter()

        def send() -> delivery.DeliveryReport:
            prepared = delivery.prepare_send(cfg, rendered, store)
            return prepared.run(delivery.SendOptions(batch_size=args.batch))

        if args.profile:
            import cProfile

            profiler = cProfile.Profile()
            report = profiler.runcall(send)
            profiler.dump_stats(args.profile)
        else:
            report = send()
        elapsed = time.perf_counter() - start
        cpu = _cpu() - cpu0
        sent = store.ledger_counts(report.issue_key)[DeliveryState.SENT]
    print(
        json.dumps(
            {
                "sent": sent,
                "elapsed": elapsed,
                "cpu": cpu,
                "rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            }
        )
    )


def _cpu() -> float:
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    return total


def run_client(
    folder: Path,
    port: int,
    subscribers: int,
    connections: int,
    profile: str = "",
    batch: int = 0,
    no_fsync: bool = False,
    dkim: bool = False,
) -> dict[str, float]:
    ws = make_workspace(folder, port)
    command = [
        sys.executable,
        __file__,
        "--client",
        "--workspace",
        str(ws),
        "--client-subscribers",
        str(subscribers),
        "--client-connections",
        str(connections),
        "--batch",
        str(batch),
        *(["--no-fsync"] if no_fsync else []),
        *(["--dkim"] if dkim else []),
    ]
    if profile:
        command += ["--profile", profile]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"client failed:\n{out.stderr}")
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


# --------------------------------------------------------------------------- mailmerge


def run_mailmerge(folder: Path, port: int, count: int) -> tuple[int, float] | None:
    """The same message through mailmerge's CLI; (messages, seconds), or None if absent."""
    mailmerge = shutil.which("mailmerge", path=str(Path(sys.executable).parent))
    if mailmerge is None:
        return None
    from newsletter import config, content, render
    from newsletter.message import Recipient, prepare

    ws = make_workspace(folder / "ws", port)
    cfg = config.load(ws, environ={config.ENV_SECRET_KEY: SECRET})
    rendered = render.render_issue(
        content.read_issue(content.find_issue(cfg.issues_dir, ISSUE)), cfg
    )
    data = prepare(rendered, cfg).personalise(Recipient("reader@example.com", "Reader")).data
    head, _, body = data.decode("utf-8").partition("\r\n\r\n")
    head = re.sub(r"(?m)^To: .*(\r\n[ \t].*)*$", "TO: {{email}}", head)
    template = folder / "template.txt"
    template.write_text(
        head.replace("\r\n", "\n") + "\n\n{% raw %}" + body.replace("\r\n", "\n") + "{% endraw %}",
        encoding="utf-8",
    )
    database = write_list(folder / "database.csv", count)
    server = folder / "server.conf"
    server.write_text(
        f"[smtp_server]\nhost = 127.0.0.1\nport = {port}\nsecurity = Never\nratelimit = 0\n",
        encoding="utf-8",
    )
    start = time.perf_counter()
    out = subprocess.run(
        [
            mailmerge,
            "--template",
            str(template),
            "--database",
            str(database),
            "--config",
            str(server),
            "--no-dry-run",
            "--no-limit",
            "--output-format",
            "raw",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    elapsed = time.perf_counter() - start
    if out.returncode != 0:
        raise SystemExit(f"mailmerge failed:\n{out.stderr[-2000:]}")
    return len(re.findall(r"(?m)^>>> message \d+ sent$", out.stdout)), elapsed


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--subscribers", type=int, default=10_000)
    parser.add_argument("--connections", type=int, nargs="+", default=[4, 8])
    parser.add_argument(
        "--rss-subscribers", type=int, default=100_000, help="0 to skip the RSS run"
    )
    parser.add_argument("--mailmerge", type=int, default=500, help="0 to skip mailmerge")
    parser.add_argument("--profile", default="", help="write a cProfile of the first send here")
    parser.add_argument("--batch", type=int, default=0, help="rows per claim (0: the default)")
    parser.add_argument(
        "--no-fsync", action="store_true", help="claims without fsync (to see what it costs)"
    )
    parser.add_argument(
        "--dkim", action="store_true", help="sign every copy (2048-bit RSA, a key made here)"
    )
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--workspace", help=argparse.SUPPRESS)
    parser.add_argument("--client-subscribers", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--client-connections", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        client(args)
        return

    claims = "claims not fsynced" if args.no_fsync else "each claim fsynced"
    signing = "; every copy DKIM-signed" if args.dkim else ""
    print(f"bench/send.py on {os.cpu_count()} cores; ledger on (SQLite file, {claims}){signing}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        sink = Sink(folder)
        expected = 0
        ours = 0.0
        try:
            runs = [(args.subscribers, k) for k in args.connections]
            if args.rss_subscribers:
                runs.append((args.rss_subscribers, args.connections[0]))
            for n, (subscribers, connections) in enumerate(runs):
                profile = args.profile if n == 0 else ""
                result = run_client(
                    folder / f"run{n}",
                    sink.port,
                    subscribers,
                    connections,
                    profile,
                    args.batch,
                    args.no_fsync,
                    args.dkim,
                )
                expected += subscribers
                rate = result["sent"] / result["elapsed"]
                if subscribers == args.subscribers:
                    ours = max(ours, rate)
                print(
                    f"newsletter  N={subscribers:>7,}  K={connections}:  "
                    f"{result['sent']:>7,.0f} sent"
                    f" in {result['elapsed']:6.2f} s = {rate:6,.0f} msgs/s;"
                    f"  client CPU {result['cpu']:6.2f} s ({result['cpu'] / result['elapsed']:.0%}"
                    f" of one core), {result['cpu'] / result['sent'] * 1e6:.0f} µs/msg;"
                    f"  peak RSS {result['rss_mib']:.1f} MiB"
                )
                if result["sent"] != subscribers:
                    print(f"  !! expected {subscribers} sent")
            if args.mailmerge:
                merged = run_mailmerge(folder / "mailmerge", sink.port, args.mailmerge)
                if merged is None:
                    print("mailmerge: not installed (pip install '.[bench]'); skipped")
                else:
                    count, seconds = merged
                    expected += count
                    their = count / seconds
                    print(
                        f"mailmerge   N={args.mailmerge:>7,}  K=1:  "
                        f"{count:>7,} sent in {seconds:6.2f} s"
                        f" = {their:6,.0f} msgs/s (its CLI, one connection per message)"
                    )
                    if their > 0:
                        print(f"ratio: newsletter is {ours / their:,.1f}x mailmerge")
        finally:
            received, sink_cpu = sink.stop()
        print(f"sink: received {received:,} messages (expected {expected:,}), CPU {sink_cpu:.1f} s")


if __name__ == "__main__":
    main()
