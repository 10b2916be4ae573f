"""`newsletter subscribers ...` through click's CliRunner, on a real database file."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from newsletter.cli import main
from newsletter.config import ENV_DB
from newsletter.models import Status
from newsletter.store import Store


@pytest.fixture
def workspace(tmp_path: Path) -> Path:
    root = tmp_path / "ws"
    root.mkdir()
    (root / "newsletter.toml").write_text('[newsletter]\nname = "Test"\n', encoding="utf-8")
    return root


def run(workspace: Path, *args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(main, ["-C", str(workspace), "subscribers", *args], env=env)


def db(workspace: Path) -> Store:
    return Store.open(workspace / ".newsletter" / "newsletter.db")


def test_import_reports_bad_rows_and_imports_the_rest(workspace: Path) -> None:
    csv_file = workspace / "list.csv"
    csv_file.write_text(
        "email;name\nann@example.com;Ann\nbroken;X\nbob@example.com;Bob\n", encoding="utf-8"
    )
    result = run(workspace, "import", str(csv_file))
    assert result.exit_code == 0, result.output
    assert f"{csv_file}:3: invalid email address 'broken'" in result.stderr
    assert "2 added" in result.stdout and "1 bad rows" in result.stdout
    with db(workspace) as store:
        assert store.count() == 2


def test_a_bad_csv_is_one_line_and_exit_1(workspace: Path) -> None:
    csv_file = workspace / "latin.csv"
    csv_file.write_bytes("email,name\nzoe@example.com,Zoë\n".encode("latin-1"))
    result = run(workspace, "import", str(csv_file))
    assert result.exit_code == 1
    assert result.stderr.splitlines() == [
        f"Error: {csv_file}:2: not UTF-8 text; save the file as UTF-8 (in Excel: 'CSV UTF-8')"
    ]
    assert "Traceback" not in result.output


def test_a_stray_quote_is_one_error_line_exit_1_and_nothing_written(workspace: Path) -> None:
    lines = ["email,name", *(f"r{i}@example.com,Reader {i}" for i in range(1_000))]
    lines[11] = 'r10@example.com,"Bob the builder'
    csv_file = workspace / "list.csv"
    csv_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = run(workspace, "import", str(csv_file))
    assert result.exit_code == 1, result.output
    assert result.stderr.splitlines() == [
        f"Error: {csv_file}:12: a double quote opens a value that runs on to line 1001"
        " (a stray quote?); a value cannot span lines: close or remove that quote;"
        " nothing was imported"
    ]
    assert result.stdout == ""
    with db(workspace) as store:
        assert store.count() == 0


def test_a_file_with_only_bad_rows_exits_1(workspace: Path) -> None:
    csv_file = workspace / "bad.csv"
    csv_file.write_text("email\nnope\nalso-nope\n", encoding="utf-8")
    result = run(workspace, "import", str(csv_file))
    assert result.exit_code == 1
    assert f"{csv_file}:2:" in result.stderr and f"{csv_file}:3:" in result.stderr
    assert "Error: " in result.stderr and "no row could be imported" in result.stderr


def test_add_list_unsubscribe_count_remove(workspace: Path) -> None:
    added = run(workspace, "add", "Ann@Example.com", "--name", "Ann", "--field", "city=Oslo")
    assert added.exit_code == 0 and "Added Ann@example.com." in added.stdout
    again = run(workspace, "add", "ann@example.com")
    assert again.exit_code == 1 and again.stderr.startswith("Error: ")
    assert "already in the list" in again.stderr
    assert run(workspace, "add", "bob@example.com").exit_code == 0
    assert run(workspace, "unsubscribe", "BOB@example.com").exit_code == 0
    listed = run(workspace, "list")
    assert listed.stdout.splitlines() == [
        "Ann@example.com\tactive\tAnn",
        "bob@example.com\tunsubscribed\t",
    ]
    only = run(workspace, "list", "--status", "unsubscribed")
    assert only.stdout.splitlines() == ["bob@example.com\tunsubscribed\t"]
    counted = run(workspace, "count").stdout.split()
    assert counted[counted.index("active") + 1] == "1"
    assert counted[counted.index("total") + 1] == "2"
    assert run(workspace, "remove", "ann@example.com").exit_code == 0
    with db(workspace) as store:
        assert store.get_subscriber("ann@example.com") is None
        bob = store.get_subscriber("bob@example.com")
        assert bob is not None and bob.status == Status.UNSUBSCRIBED


def test_bad_field_and_unknown_subscriber(workspace: Path) -> None:
    bad = run(workspace, "add", "a@example.com", "--field", "novalue")
    assert bad.exit_code == 1 and "KEY=VALUE" in bad.stderr
    missing = run(workspace, "unsubscribe", "ghost@example.com")
    assert missing.exit_code == 1 and "no subscriber 'ghost@example.com'" in missing.stderr


def test_export_to_stdout_and_to_a_file(workspace: Path) -> None:
    run(workspace, "add", "a@example.com", "--name", "A", "--field", "plan=pro")
    out = run(workspace, "export")
    assert out.exit_code == 0
    lines = out.stdout.splitlines()
    assert lines[0] == "email,name,status,created_at,tags,plan"
    assert lines[1].startswith("a@example.com,A,active,") and lines[1].endswith(",,pro")
    target = workspace / "out" / "export.csv"
    target.parent.mkdir()
    written = run(workspace, "export", str(target))
    assert written.exit_code == 0 and "Wrote 1 subscribers" in written.stderr
    assert target.read_text(encoding="utf-8").splitlines() == lines
    assert [p.name for p in target.parent.iterdir()] == ["export.csv"]  # no temp files left


def test_db_from_the_environment(workspace: Path, tmp_path: Path) -> None:
    other = tmp_path / "elsewhere" / "list.db"
    other.parent.mkdir()
    assert run(workspace, "add", "a@example.com", env={ENV_DB: str(other)}).exit_code == 0
    with Store.open(other) as store:
        assert store.count() == 1
    assert not (workspace / ".newsletter" / "newsletter.db").exists()


def test_export_into_a_missing_folder_is_one_error_and_creates_nothing(
    workspace: Path, tmp_path: Path
) -> None:
    target = tmp_path / "no-such-folder" / "list.csv"
    result = run(workspace, "export", str(target))
    assert result.exit_code == 1
    assert result.stderr.startswith(f"Error: {target}: the folder")
    assert not target.parent.exists()
