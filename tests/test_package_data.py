"""The shipped theme and example list: found the same way in a checkout and in a real wheel,
and `newsletter demo` working from either without the repository's layout."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from click.testing import CliRunner

from newsletter import config, package_data
from newsletter.cli import main
from newsletter.store import Store
from tests.support import REPO, TEST_SECRET_KEY, copy_example
from tests.support.delivery import EXAMPLE_ACTIVE

LOCATE = (
    "import json, newsletter, newsletter.package_data as p\n"
    "print(json.dumps([newsletter.__file__, str(p.default_theme_dir()),"
    " str(p.example_subscribers())]))\n"
)


def test_what_pyproject_ships_is_what_package_data_looks_for() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    force = pyproject["tool"]["hatch"]["build"]["targets"]["wheel"]["force-include"]
    shipped = package_data.SHIPPED.items()
    assert force == {checkout: f"newsletter/{inside}" for inside, checkout in shipped}


def test_a_checkout_uses_the_top_level_folders() -> None:
    assert package_data.default_theme_dir() == REPO / "templates"
    assert (package_data.default_theme_dir() / "email.mjml").is_file()
    assert package_data.example_subscribers() == REPO / "examples" / "subscribers.csv"


@pytest.fixture(scope="module")
def installed_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package built as a wheel (hatchling, offline) and installed into a target folder."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "hatchling", "build", "-t", "wheel", "-d", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    (wheel,) = out.glob("newsletter-*.whl")
    target = out / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-index",
         "--no-compile", "--target", str(target), str(wheel)],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    return target


def wheel_env(target: Path) -> dict[str, str]:
    """The installed wheel first on the path (its dependencies come from this venv)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NEWSLETTER_")}
    env["PYTHONPATH"] = str(target)
    env[config.ENV_SECRET_KEY] = TEST_SECRET_KEY
    return env


def test_an_installed_wheel_uses_its_own_copies(installed_wheel: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", LOCATE],
        cwd=tmp_path, env=wheel_env(installed_wheel), capture_output=True, text=True,
        timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    module, theme, csv = map(Path, json.loads(result.stdout))
    package = installed_wheel / "newsletter"
    assert module == package / "__init__.py"  # not the checkout
    assert theme == package / "_theme" and (theme / "email.mjml").is_file()
    assert csv == package / "_examples" / "subscribers.csv"
    assert csv.read_bytes() == (REPO / "examples" / "subscribers.csv").read_bytes()


def test_the_demo_from_an_installed_wheel_needs_no_repository(
    installed_wheel: Path, tmp_path: Path
) -> None:
    workspace = copy_example(tmp_path / "ws")  # config and issues only: no examples/
    result = subprocess.run(
        [sys.executable, "-m", "newsletter", "demo"],
        cwd=workspace, env=wheel_env(installed_wheel), capture_output=True, text=True,
        timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"The SMTP sink received {EXAMPLE_ACTIVE} messages" in result.stdout
    assert len(list((workspace / ".newsletter" / "demo" / "sink" / "new").iterdir())) == 10


def test_the_demo_in_a_workspace_outside_the_repository(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(config.ENV_SECRET_KEY, TEST_SECRET_KEY)
    monkeypatch.delenv(config.ENV_DKIM_KEY_FILE, raising=False)
    workspace = copy_example(tmp_path / "ws")
    result = CliRunner().invoke(main, ["-C", str(workspace), "demo"])
    assert result.exit_code == 0, result.output
    assert "Read 11 example subscribers" in result.stdout  # one of them unsubscribed
    assert f"The SMTP sink received {EXAMPLE_ACTIVE} messages" in result.stdout
    with Store.open(workspace / ".newsletter" / "demo" / "demo.db") as store:
        assert sum(store.ledger_counts("001-trams-ferries-benches").values()) == EXAMPLE_ACTIVE


def test_the_demo_says_what_it_needs_in_a_workspace_without_issues(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(config.ENV_SECRET_KEY, TEST_SECRET_KEY)
    workspace = tmp_path / "fresh"
    assert CliRunner().invoke(main, ["init", str(workspace)]).exit_code == 0
    result = CliRunner().invoke(main, ["-C", str(workspace), "demo"])
    assert result.exit_code == 1
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"Error: {workspace / 'issues'}: the demo sends an issue")
    assert "run it in a checkout of newsletter" in line
    assert not (workspace / ".newsletter" / "demo").exists()
