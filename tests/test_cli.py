"""The command line: every command, --help everywhere, and one clean line for each bad input."""

from __future__ import annotations

import ast
import importlib.metadata
import os
import re
import shutil
import signal
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import click
import pytest
from click.testing import CliRunner, Result

from newsletter import __version__
from newsletter.cli import main
from tests.support import EXAMPLE_SLUG, REPO, TEST_SECRET_KEY

ERROR_LINE = re.compile(
    r"^Error: (?P<path>/[^:;]+?)(?::(?P<line>\d+))?: (?P<what>[^;]+); (?P<hint>.+)$"
)


def run(runner: CliRunner, workspace: Path, *args: str) -> Result:
    return runner.invoke(main, ["-C", str(workspace), *args])


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under root (state folder included), to prove a failed command wrote nothing."""
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def assert_one_error_line(result: Result, path: Path, line: int | None = None) -> re.Match[str]:
    assert result.exit_code == 1, (result.exit_code, result.output)
    assert isinstance(result.exception, SystemExit)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    match = ERROR_LINE.match(lines[0])
    assert match, lines[0]
    assert match["path"] == str(path), (match["path"], str(path))
    assert match["line"] == (str(line) if line is not None else None), lines[0]
    return match


def bad_input(
    runner: CliRunner, workspace: Path, args: list[str], path: Path, line: int | None = None
) -> str:
    """Run a command that must fail cleanly and change nothing on disk."""
    before = snapshot(workspace)
    result = run(runner, workspace, *args)
    match = assert_one_error_line(result, path, line)
    assert snapshot(workspace) == before, "a failed command changed files"
    return match["what"]


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data, encoding="utf-8")
    return path


@pytest.fixture
def example_dir(workspace: Path) -> Path:
    return workspace / "issues" / EXAMPLE_SLUG


@pytest.fixture
def second(runner: CliRunner, workspace: Path) -> Path:
    """An empty issue 2."""
    result = run(
        runner, workspace, "issue", "new", "--title", "Second Thoughts", "--date", "2026-11-27"
    )
    assert result.exit_code == 0, result.output
    return workspace / "issues" / "002-second-thoughts"


# --- the commands ----------------------------------------------------------------------------


def test_init_creates_a_workspace_once(runner: CliRunner, tmp_path: Path) -> None:
    target = tmp_path / "letters"
    result = runner.invoke(main, ["init", str(target), "--name", "Letters from the Quay"])
    assert result.exit_code == 0, result.output
    assert (target / "newsletter.toml").is_file()
    assert (target / "issues").is_dir() and (target / "templates").is_dir()
    assert f"created {target / 'newsletter.toml'}" in result.stdout
    assert 'name = "Letters from the Quay"' in (target / "newsletter.toml").read_text(
        encoding="utf-8"
    )
    listing = runner.invoke(main, ["-C", str(target), "issue", "list"])
    assert listing.exit_code == 0 and "No issues yet" in listing.stdout
    again = runner.invoke(main, ["init", str(target)])
    assert "already exists" in assert_one_error_line(again, target / "newsletter.toml")["what"]


def test_issue_new_prints_path_and_number(runner: CliRunner, workspace: Path) -> None:
    result = run(
        runner, workspace, "issue", "new", "--title", "Second Thoughts", "--date", "2026-11-27"
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        str(workspace.resolve() / "issues" / "002-second-thoughts"),
        "Created issue 2: Second Thoughts (2026-11-27)",
    ]
    bad_date = run(runner, workspace, "issue", "new", "--date", "27/11/2026")
    assert bad_date.exit_code == 2 and "Traceback" not in bad_date.output
    assert bad_date.stderr.splitlines() == [
        "Error: Invalid value for '--date': '27/11/2026' does not match the format"
        " '%Y-%m-%d'; see `newsletter issue new --help`"
    ]


def test_issue_list(runner: CliRunner, workspace: Path, second: Path) -> None:
    result = run(runner, workspace, "issue", "list")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert re.match(
        r"\s+1\s+2026-11-20\s+5 articles\s+001-trams-ferries-benches\s+Trams, Ferries", lines[0]
    )
    assert re.match(
        r"\s+2\s+2026-11-27\s+0 articles\s+002-second-thoughts\s+Second Thoughts", lines[1]
    )


def test_issue_add_remove_move_show(
    runner: CliRunner, workspace: Path, example_dir: Path, second: Path
) -> None:
    articles = example_dir / "articles"
    # The same URLs were in issue 1: refused unless forced.
    refused = run(
        runner, workspace, "issue", "add", "2", str(articles / "05-what-benches-tell-us.md")
    )
    assert refused.exit_code == 1 and "--force" in refused.stderr
    result = run(
        runner,
        workspace,
        "issue",
        "add",
        "2",
        "--force",
        str(articles / "05-what-benches-tell-us.md"),
        str(articles / "01-harbour-tram-opens-early.md"),
    )
    assert result.exit_code == 0, result.output
    added = [line for line in result.stdout.splitlines() if line.startswith("added ")]
    assert [line.split()[1] for line in added] == [
        "01-what-benches-tell-us.md",
        "02-harbour-tram-opens-early.md",
    ]
    assert (second / "images" / "bench.png").is_file()

    result = run(
        runner,
        workspace,
        "issue",
        "add",
        "002-second-thoughts",
        "--force",
        str(articles / "02-ferry-timetable-waterfront.md"),
    )
    assert result.stdout.startswith("added 03-ferry-timetable-waterfront.md ")

    result = run(runner, workspace, "issue", "move", "2", "ferry-timetable-waterfront", "1")
    assert result.exit_code == 0, result.output
    assert [line.split(". ", 1)[1] for line in result.stdout.splitlines()] == [
        "03-ferry-timetable-waterfront.md",
        "01-what-benches-tell-us.md",
        "02-harbour-tram-opens-early.md",
    ]
    result = run(runner, workspace, "issue", "remove", str(second), "3")
    assert result.exit_code == 0, result.output
    assert "removed 02-harbour-tram-opens-early.md" in result.stdout

    result = run(runner, workspace, "issue", "show", "2")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "Issue 2 · 2026-11-27 · Second Thoughts" in out
    assert re.search(r"  1\. The Ferry Timetable That Rewired a Waterfront  \[\d+ words\]", out)
    assert re.search(r"  2\. What the Humble Bench Tells Us About a City  \[\d+ words\]", out)
    assert "Harbour Tram" not in out
    assert "By Marguerite Ollerenshaw, The Quayside Review, 11/16/26" in out
    assert "Subject:   The Ferry Timetable That Rewired a Waterfront | What the Humble Bench" in out
    assert re.search(r"Total: 2 articles, \d+ words", out)
    assert re.search(
        r"Email HTML: \d+\.\d KB, \d+% of it text; about [\d,]+ more words fit before Gmail", out
    )


def test_show_example(runner: CliRunner, workspace: Path) -> None:
    result = run(runner, workspace, "issue", "show", EXAMPLE_SLUG)
    assert result.exit_code == 0, result.output
    assert "  5. What the Humble Bench Tells Us About a City" in result.stdout
    assert "     The Harbour Ledger, 11/18/26" in result.stdout  # the house brief's byline


def test_build_writes_three_files_and_prints_sizes(runner: CliRunner, workspace: Path) -> None:
    result = run(runner, workspace, "build", "1")
    assert result.exit_code == 0, result.output
    out_dir = workspace.resolve() / ".newsletter" / "build" / EXAMPLE_SLUG
    for name in ("email.html", "email.txt", "web.html"):
        size = (out_dir / name).stat().st_size
        assert f"  {out_dir / name}  {size / 1024:.1f} KB\n" in result.stdout
    assert result.stdout.startswith("Subject: Port Alder’s Harbour Tram Opens Three Weeks Early | ")
    assert (out_dir / "images" / "harbour-tram.png").is_file()
    assert result.stderr == ""  # no warnings for the example
    assert not (workspace / "issues" / EXAMPLE_SLUG / "email.html").exists()


def test_build_to_another_folder_and_warn_over_gmail_clip(
    runner: CliRunner, workspace: Path, example_dir: Path, tmp_path: Path
) -> None:
    issue_md = example_dir / "issue.md"
    names = [f"0{i}-{n}" for i, n in enumerate(["a", "b", "c", "d", "e", "f"], start=6)]
    for index, name in enumerate(names):
        source = example_dir / "articles" / sorted(os.listdir(example_dir / "articles"))[index % 5]
        # The issue lists copies of its articles again (only `issue add` refuses duplicates).
        shutil.copyfile(source, example_dir / "articles" / f"{name}.md")
    issue_md.write_text(
        issue_md.read_text(encoding="utf-8").replace(
            "---\nWelcome", "".join(f"  - {n}.md\n" for n in names) + "---\nWelcome"
        ),
        encoding="utf-8",
    )
    out = tmp_path / "out"
    result = run(runner, workspace, "build", "1", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert (out / "email.html").stat().st_size > 102 * 1024
    assert re.search(
        r"^Warning: email HTML is \d+ KB, over Gmail's ~102 KB clipping size", result.stderr, re.M
    )
    assert not (workspace / ".newsletter" / "build").exists()


def test_version(runner: CliRunner) -> None:
    result = runner.invoke(main, ["--version"])
    assert result.exit_code == 0
    assert result.stdout == f"newsletter, version {__version__}\n"


def command_paths(command: click.Command, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    yield path
    if isinstance(command, click.Group):
        for name, sub in sorted(command.commands.items()):
            yield from command_paths(sub, (*path, name))


def test_help_works_on_every_command_outside_a_workspace(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    nowhere = tmp_path / "not-a-workspace"
    nowhere.mkdir()
    monkeypatch.chdir(nowhere)
    paths = list(command_paths(main))
    assert {("build",), ("init",), ("issue", "new"), ("issue", "add"), ("issue", "show")} <= set(
        paths
    )
    for path in paths:
        for flag in ("--help", "-h"):
            result = runner.invoke(main, [*path, flag])
            assert result.exit_code == 0, (path, result.output)
            assert result.stdout.startswith("Usage: "), path
    assert list(nowhere.iterdir()) == []


def test_outside_a_workspace_a_command_says_so(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(main, ["issue", "list"])
    assert "no newsletter.toml here" in assert_one_error_line(result, tmp_path.resolve())["what"]


# --- misuse: one line, exit 2 ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["send"], "Error: Missing argument 'ISSUE'; see `newsletter send --help`"),
        (
            ["send", "1", "--bogus"],
            "Error: No such option '--bogus'; see `newsletter send --help`",
        ),
        (
            ["send", "1", "--limit", "zero"],
            "Error: Invalid value for '--limit': 'zero' is not a valid integer range;"
            " see `newsletter send --help`",
        ),
        (
            ["subscribers", "frobnicate"],
            "Error: No such command 'frobnicate'; see `newsletter subscribers --help`",
        ),
        (["--bogus"], "Error: No such option '--bogus'; see `newsletter --help`"),
    ],
)
def test_a_usage_error_is_one_line_and_exit_2(
    runner: CliRunner, workspace: Path, args: list[str], line: str
) -> None:
    before = snapshot(workspace)
    result = runner.invoke(main, ["-C", str(workspace), *args], prog_name="newsletter")
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert result.stderr.splitlines() == [line]
    assert snapshot(workspace) == before


def test_a_group_alone_shows_its_help_and_exits_2(runner: CliRunner) -> None:
    result = runner.invoke(main, ["subscribers"], prog_name="newsletter")
    assert result.exit_code == 2
    assert result.stderr.startswith("Usage: newsletter subscribers [OPTIONS] COMMAND [ARGS]...")
    assert "Error" not in result.stderr


def test_a_failure_is_exit_1_and_success_exit_0(runner: CliRunner, workspace: Path) -> None:
    failed = run(runner, workspace, "send", "42")
    assert failed.exit_code == 1 and failed.stderr.startswith("Error: ")
    assert run(runner, workspace, "issue", "list").exit_code == 0


# --- bad input: one line, exit 1, nothing written --------------------------------------------


def test_bad_config(runner: CliRunner, workspace: Path) -> None:
    config_path = workspace / "newsletter.toml"
    config_path.write_text(
        config_path.read_text(encoding="utf-8") + "\n[smtp2]\nhost = 'x'\n", encoding="utf-8"
    )
    line = config_path.read_text(encoding="utf-8").splitlines().index("[smtp2]") + 1
    what = bad_input(runner, workspace, ["build", "1"], config_path.resolve(), line)
    assert what == "unknown section [smtp2]"


@pytest.mark.parametrize(
    ("text", "line", "what"),
    [
        ("---\ntitle: Ferry: the return\n---\nbody\n", 2, "malformed front matter"),
        ("---\nauthor: Somebody\n---\nbody\n", 1, "missing title"),
        ("---\ntitle: T\nsubtitle: S\n---\nbody\n", 3, "unknown front matter field 'subtitle'"),
        (b"---\ntitle: T\n---\nOne.\n\nTwo \xe9t\xe9.\n", 6, "not UTF-8 text"),
        ("---\ntitle: T\n---\nOne.\n\n![A dog](dog.png)\n", 6, "image 'dog.png' not found"),
        ("no front matter at all\n", 1, "no front matter"),
    ],
)
def test_issue_add_bad_article(
    runner: CliRunner,
    workspace: Path,
    second: Path,
    tmp_path: Path,
    text: str | bytes,
    line: int,
    what: str,
) -> None:
    article = write(tmp_path / "drafts" / "article.md", text)
    assert bad_input(
        runner, workspace, ["issue", "add", "2", str(article)], article, line
    ).startswith(what)


FRESH_ARTICLE = (
    "---\ntitle: Night Buses Return\nsource: The Ledger\nurl: https://example.org/night-buses\n"
    "---\nThey are back.\n"
)


def test_same_article_added_twice(
    runner: CliRunner, workspace: Path, second: Path, tmp_path: Path
) -> None:
    source = write(tmp_path / "night-buses.md", FRESH_ARTICLE)
    assert run(runner, workspace, "issue", "add", "2", str(source)).exit_code == 0
    what = bad_input(runner, workspace, ["issue", "add", "2", str(source)], source)
    assert "already in" in what and "01-night-buses.md" in what


def test_one_bad_file_means_none_is_added(
    runner: CliRunner, workspace: Path, example_dir: Path, second: Path, tmp_path: Path
) -> None:
    good = write(tmp_path / "night-buses.md", FRESH_ARTICLE)
    bad = write(tmp_path / "bad.md", "---\ntitle: [unclosed\n---\n")
    bad_input(runner, workspace, ["issue", "add", "2", str(good), str(bad)], bad, 3)


def test_build_issue_with_no_articles(runner: CliRunner, workspace: Path, second: Path) -> None:
    what = bad_input(runner, workspace, ["build", "2"], second.resolve() / "issue.md")
    assert what == "the issue has no articles"


@pytest.mark.parametrize("ref", ["7", "no-such-issue"])
def test_unknown_issue(runner: CliRunner, workspace: Path, ref: str) -> None:
    for command in (
        ["build", ref],
        ["issue", "show", ref],
        ["issue", "add", ref, "x.md"],
        ["issue", "remove", ref, "1"],
    ):
        what = bad_input(runner, workspace, command, workspace.resolve() / "issues")
        assert what == f"no issue '{ref}'"


def test_unknown_article_and_bad_position(
    runner: CliRunner, workspace: Path, example_dir: Path
) -> None:
    issue_md = example_dir.resolve() / "issue.md"
    assert (
        bad_input(runner, workspace, ["issue", "remove", "1", "nope"], issue_md)
        == "no article 'nope' in this issue"
    )
    assert (
        bad_input(runner, workspace, ["issue", "move", "1", "2", "9"], issue_md)
        == "position 9 is out of range"
    )


def test_build_with_a_broken_article_in_the_issue(
    runner: CliRunner, workspace: Path, example_dir: Path
) -> None:
    article = example_dir / "articles" / "04-library-square-remarks.md"
    original = article.read_bytes()
    article.write_bytes(original.replace(b"deputy mayor", b"deputy m\xe4yor", 1))
    line = original[: original.index(b"deputy mayor")].count(b"\n") + 1
    assert bad_input(runner, workspace, ["build", "1"], article.resolve(), line) == "not UTF-8 text"
    article.write_bytes(original.replace(b"title:", b"titel:", 1))
    assert bad_input(runner, workspace, ["build", "1"], article.resolve(), 2).startswith(
        "unknown front matter field 'titel'"
    )


def test_build_with_a_missing_image(runner: CliRunner, workspace: Path, example_dir: Path) -> None:
    (example_dir / "images" / "ferry-quay.png").unlink()
    article = example_dir.resolve() / "articles" / "02-ferry-timetable-waterfront.md"
    line = (
        article.read_text(encoding="utf-8").splitlines().index("image: ../images/ferry-quay.png")
        + 1
    )
    what = bad_input(runner, workspace, ["build", "1"], article, line)
    assert what == "image '../images/ferry-quay.png' not found"


def test_build_with_an_unknown_template_variable(runner: CliRunner, workspace: Path) -> None:
    template = write(
        workspace / "templates" / "article.mjml",
        "<mj-section>\n  <mj-column>\n    <mj-text>{{ article.kicker }}</mj-text>\n"
        "  </mj-column>\n</mj-section>\n",
    )
    what = bad_input(runner, workspace, ["build", "1"], template.resolve(), 3)
    assert what.startswith("unknown template variable")


def test_build_with_an_mjml_error(runner: CliRunner, workspace: Path) -> None:
    template = write(
        workspace / "templates" / "email.mjml",
        '{% extends "!default/email.mjml" %}\n'
        "{% block footer %}<mj-section><mj-column>{% endblock %}\n",
    )
    assert bad_input(runner, workspace, ["build", "1"], template.resolve()).startswith("MJML error")


def test_build_with_a_template_syntax_error(runner: CliRunner, workspace: Path) -> None:
    template = write(
        workspace / "templates" / "email.txt", "{{ newsletter.name }}\n{% for a in articles %}\n"
    )
    assert bad_input(runner, workspace, ["build", "1"], template.resolve(), 2).startswith(
        "template syntax error"
    )


def test_a_failed_build_keeps_the_previous_output(runner: CliRunner, workspace: Path) -> None:
    assert run(runner, workspace, "build", "1").exit_code == 0
    write(workspace / "templates" / "email.txt", "{{ nope }}\n")
    bad_input(
        runner, workspace, ["build", "1"], (workspace / "templates" / "email.txt").resolve(), 1
    )


# --- real processes ------------------------------------------------------------------------


def subprocess_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
    env["PYTHONPATH"] = str(REPO)
    env["NEWSLETTER_SECRET_KEY"] = TEST_SECRET_KEY
    return env


@pytest.mark.server
def run_process(command: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """``command`` in a fresh process that imports this repository, with the test key."""
    return subprocess.run(
        command,
        cwd=cwd,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.server
def test_python_dash_m_builds_in_a_fresh_process(workspace: Path) -> None:
    result = run_process([sys.executable, "-m", "newsletter", "build", "1"], workspace)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    out_dir = workspace.resolve() / ".newsletter" / "build" / EXAMPLE_SLUG
    assert sorted(p.name for p in out_dir.iterdir() if p.is_file()) == [
        "email.html",
        "email.txt",
        "sample.eml",
        "sample.html",
        "web.html",
    ]
    golden = REPO / "tests" / "golden"
    assert (out_dir / "email.html").read_bytes() == (golden / "example-email.html").read_bytes()
    assert (out_dir / "email.txt").read_bytes() == (golden / "example-email.txt").read_bytes()


@pytest.mark.server
def test_bad_input_in_a_fresh_process_is_one_line(workspace: Path) -> None:
    result = run_process([sys.executable, "-m", "newsletter", "build", "42"], workspace)
    assert result.returncode == 1
    assert result.stdout == ""
    assert len(result.stderr.splitlines()) == 1
    assert result.stderr.startswith(f"Error: {workspace.resolve() / 'issues'}: no issue '42'; ")


@pytest.mark.server
def test_usage_error_in_a_fresh_process_is_exit_2(workspace: Path) -> None:
    """A script can tell misuse (2) from failure (1): `newsletter send` without its ISSUE."""
    result = run_process([sys.executable, "-m", "newsletter", "send"], workspace)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "Error: Missing argument 'ISSUE'; see `python -m newsletter send --help`"
    ]
    failed = run_process([sys.executable, "-m", "newsletter", "send", "42"], workspace)
    assert failed.returncode == 1, failed.stderr


@pytest.mark.server
def test_ctrl_c_is_one_line_and_exit_130(workspace: Path) -> None:
    """Ctrl-C while a command waits (here: reading a CSV from a pipe that never ends)."""
    fifo = workspace / "list.csv"
    os.mkfifo(fifo)
    proc = subprocess.Popen(
        [sys.executable, "-m", "newsletter", "subscribers", "import", str(fifo)],
        cwd=workspace, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        with fifo.open("w") as writer:  # returns once the command has opened the pipe
            writer.write("email,name\n")
            writer.flush()
            proc.send_signal(signal.SIGINT)
            _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert stderr.strip().splitlines() == ["Interrupted."]


def installed_script() -> Path | None:
    """The `newsletter` console script, if one is installed and imports this very repository."""
    for candidate in (shutil.which("newsletter"), Path(sys.executable).parent / "newsletter"):
        if candidate is None or not Path(candidate).is_file():
            continue
        shebang = Path(candidate).read_text(encoding="utf-8", errors="replace").splitlines()[0]
        python = shebang.removeprefix("#!").strip()
        probe = subprocess.run(
            [python, "-c", "import newsletter.cli; print(newsletter.cli.__file__)"],
            cwd="/", env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        if (
            probe.returncode == 0
            and Path(probe.stdout.strip()).resolve() == REPO / "newsletter" / "cli.py"
        ):
            return Path(candidate)
    return None


@pytest.mark.server
def test_console_script(workspace: Path) -> None:
    """Runs the installed `newsletter` command when it is this repository's; otherwise the
    same entry point (``newsletter.cli:main``, as pyproject declares) in a fresh process."""
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"][
        "scripts"
    ]
    assert scripts == {"newsletter": "newsletter.cli:main"}
    declared = importlib.metadata.entry_points(group="console_scripts", name="newsletter")
    assert all(ep.value == "newsletter.cli:main" for ep in declared)
    script = installed_script()
    if script is not None:
        command = [str(script)]
    else:
        command = [
            sys.executable,
            "-c",
            "import sys; from newsletter.cli import main; sys.argv[0] = 'newsletter'; main()",
        ]
    result = run_process(
        [*command, "-C", str(workspace), "build", "1", "--out", str(workspace / "out")], workspace
    )
    assert result.returncode == 0, result.stderr
    assert (workspace / "out" / "email.html").stat().st_size > 10_000
    version = subprocess.run(
        [*command, "--version"],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert version.stdout == f"newsletter, version {__version__}\n"


@pytest.mark.server
def test_help_does_not_load_the_css_inliner(workspace: Path) -> None:
    """premailer (with cssutils and requests) is imported when an issue is rendered, not before."""
    code = (
        "import sys\n"
        "from newsletter.cli import main\n"
        "try:\n    main(['issue', 'list'])\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in ('premailer', 'cssutils', 'requests') if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=workspace,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "[]"


@pytest.mark.server
def test_importing_the_cli_loads_only_what_every_command_needs() -> None:
    """Commands import the send, preview, import and service machinery when they run."""
    code = (
        "import sys\n"
        "import newsletter.cli\n"
        "print(sorted(m for m in sys.modules if m.startswith('newsletter.')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    loaded = {name.split(".")[1] for name in ast.literal_eval(result.stdout)}
    later = {"bounces", "check", "delivery", "demo", "dkim", "importers", "message", "preview"}
    later |= {"server", "sink", "store", "tokens", "transport"}
    assert {"cli", "config", "content", "render"} <= loaded
    assert not loaded & later, loaded & later


def test_preview_defaults_in_help_match_the_library(runner: CliRunner) -> None:
    """cli writes preview's defaults out (so --help need not import it); they must agree."""
    from newsletter import preview

    result = runner.invoke(main, ["preview", "--help"])
    assert result.exit_code == 0
    assert f"default: {preview.DEFAULT_PORT}," in result.stdout
    assert f"[default: {preview.DEFAULT_HOST}]" in result.stdout
