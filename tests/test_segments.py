"""Segments: the expression language, its errors, its SQL, and the [segments] config."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from newsletter import config
from newsletter.cli import main
from newsletter.db import POSTGRES, SQLITE, Dialect
from newsletter.errors import ConfigError
from newsletter.models import Status, Subscriber
from newsletter.segments import (
    BoolOp,
    FieldTest,
    HasStatus,
    HasTag,
    Joined,
    Node,
    Not,
    SegmentError,
    SegmentSyntaxError,
    make_segment,
    parse,
    to_sql,
)
from newsletter.store import Store
from tests.support.database import ENGINES, new_database


def test_precedence_not_and_or_and_parentheses() -> None:
    assert parse("tag:a or tag:b and not tag:c") == BoolOp(
        "or", (HasTag("a"), BoolOp("and", (HasTag("b"), Not(HasTag("c")))))
    )
    assert parse("(tag:a OR tag:b) AND NOT NOT status:active") == BoolOp(
        "and",
        (BoolOp("or", (HasTag("a"), HasTag("b"))), Not(Not(HasStatus(Status.ACTIVE)))),
    )
    assert parse('field:City = "Lisbon" and field:plan != pro and field:note') == BoolOp(
        "and",
        (
            FieldTest("city", "=", "Lisbon"),
            FieldTest("plan", "!=", "pro"),
            FieldTest("note", "has"),
        ),
    )
    assert parse('tag:"Lorem  Editors"') == HasTag("lorem editors")
    assert parse("joined >= 2026-01-01") == Joined(">=", dt.date(2026, 1, 1))
    assert parse("field:city=Lisbon") == FieldTest("city", "=", "Lisbon")
    assert parse(r'field:quote = "say \"hi\""') == FieldTest("quote", "=", 'say "hi"')


@pytest.mark.parametrize(
    ("text", "position", "message"),
    [
        (
            "tag:europe and",
            15,
            "expected tag:, status:, field:, joined, 'not' or '(', found the end",
        ),
        ("tag:europe tag:paused", 12, "expected 'and', 'or' or the end, found 'tag:'"),
        ("(tag:a or tag:b", 16, "expected ')', found the end"),
        ("tag:", 5, "expected a tag after 'tag:', found the end"),
        ("status:sleeping", 8, "unknown status 'sleeping'"),
        ("colour:red", 1, "unknown 'colour:'"),
        ("joined > yesterday", 10, "expected a date as YYYY-MM-DD, found 'yesterday'"),
        ("joined > 2026-02-30", 10, "expected a date as YYYY-MM-DD"),
        ("joined != 2026-01-01", 8, "expected <, <=, >, >= or = after 'joined'"),
        ("field:city > 3", 12, "a field compares with = or !=, not >"),
        ('field:city = "open', 14, "a quoted value is not closed"),
        ("", 1, "the segment is empty"),
        ("tag:a and or tag:b", 11, "found 'or'"),
        ("tag:a;b", 5, "comma, semicolon"),
    ],
)
def test_errors_name_the_position(text: str, position: int, message: str) -> None:
    with pytest.raises(SegmentSyntaxError) as info:
        parse(text)
    assert info.value.position == position
    assert message in info.value.message


@pytest.mark.parametrize("dialect", [SQLITE, POSTGRES], ids=ENGINES)
def test_values_are_bound_never_spliced_into_the_sql(dialect: Dialect) -> None:
    hostile_tag = "x') or 1=1 --"
    hostile = "x'); DROP TABLE subscribers; --"
    node = parse(f'tag:"{hostile_tag}" or field:city = "{hostile}" or field:aaa != "\'"')
    sql, params = to_sql(node, dialect)
    assert hostile not in sql and hostile_tag not in sql and "'" not in sql.replace("<> ''", "")
    assert params == [hostile_tag, "city", hostile, "aaa", "'"]


def test_segment_errors_name_the_segment_line_and_position(tmp_path: Path) -> None:
    (tmp_path / "newsletter.toml").write_text(
        '[newsletter]\nname = "N"\n\n[segments]\n# readers abroad\n'
        'name = "tag:a"\neurope = "tag:europe and not tag:paused or"\n',
        encoding="utf-8",
    )
    with pytest.raises(ConfigError) as info:
        config.load(tmp_path, environ={})
    assert str(info.value) == (
        f"{tmp_path / 'newsletter.toml'}:7: [segments] europe: position 33: expected tag:,"
        " status:, field:, joined, 'not' or '(', found the end; see README, Segments, for the"
        " language"
    )


def test_segments_load_from_the_config(tmp_path: Path) -> None:
    (tmp_path / "newsletter.toml").write_text(
        '[segments]\neurope = "tag:europe"\nlisbon = \'field:city = "Lisbon"\'\n',
        encoding="utf-8",
    )
    cfg = config.load(tmp_path, environ={})
    assert list(cfg.segments) == ["europe", "lisbon"]
    assert cfg.segments["lisbon"].node == FieldTest("city", "=", "Lisbon")
    with pytest.raises(ConfigError, match="must be a string"):
        (tmp_path / "newsletter.toml").write_text("[segments]\nx = 3\n", encoding="utf-8")
        config.load(tmp_path, environ={})
    with pytest.raises(SegmentError, match="not a usable name"):
        make_segment("a b", "tag:x")


# --- SQL against a Python reading of the same expression ---------------------------------


def holds(node: Node, sub: Subscriber, tags: set[str]) -> bool:
    """What the expression means, in Python, for one subscriber."""
    if isinstance(node, HasTag):
        return node.tag in tags
    if isinstance(node, HasStatus):
        return sub.status == node.status
    if isinstance(node, FieldTest):
        value = next((v for k, v in sub.fields.items() if k.lower() == node.key), None)
        if node.op == "has":
            return bool(value and value.strip())
        equal = value is not None and value.lower() == node.value.lower()
        return equal if node.op == "=" else not equal
    if isinstance(node, Joined):
        # The sign-up date the import read from the file, else when the row was added.
        day = SIGNED_UP.get(sub.email, sub.created_at.astimezone(dt.UTC).date())
        return {
            "<": day < node.day,
            "<=": day <= node.day,
            ">": day > node.day,
            ">=": day >= node.day,
            "=": day == node.day,
        }[node.op]
    if isinstance(node, Not):
        return not holds(node.operand, sub, tags)
    results = [holds(operand, sub, tags) for operand in node.operands]
    return all(results) if node.op == "and" else any(results)


TAGS = ("europe", "harbours", "paused", "lorem editors")
SIGNED_UP: dict[str, dt.date] = {}  # the population's sign-up days, by address
CITIES = ("Lisbon", "lisbon", "Oslo", "")


@pytest.fixture(scope="module", params=ENGINES)
def population(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Store, dict[int, set[str]]]]:
    """60 subscribers over every combination of status, tags, city and sign-up day, on
    each engine (the segments' SQL is the store's contract too)."""
    file = tmp_path_factory.mktemp("population") / "db.sqlite"
    statuses = (Status.ACTIVE, Status.UNSUBSCRIBED, Status.PENDING)
    signed_up = []
    with new_database(request.param, file, request) as database, Store.open(database) as store:
        for i in range(60):
            address = f"r{i}@example.org"
            city = CITIES[i % 4]
            sub = store.add_subscriber(
                address, fields={"City": city} if city else {}, status=statuses[i % 3]
            )
            store.change_tags(sub.id, add=[tag for bit, tag in enumerate(TAGS) if i >> bit & 1])
            day = dt.date(2025, 12, 30) + dt.timedelta(days=i % 5)
            SIGNED_UP[address] = day
            signed_up.append((f"{day}T{i % 24:02d}:30:00+00:00", sub.id))
        # The sign-up dates an import reads from a file (test_person has the import's).
        with store._transaction() as conn:
            conn.executemany("UPDATE subscribers SET signed_up = ? WHERE id = ?", signed_up)
        tags_of = {s.id: set(store.tags_of(s.id)) for s in store.list_subscribers()}
        yield store, tags_of


TERMS = st.sampled_from(
    [
        "tag:europe",
        "tag:harbours",
        "tag:paused",
        'tag:"lorem editors"',
        "status:active",
        "status:pending",
        'field:city = "LISBON"',
        "field:city != oslo",
        "field:city",
        "joined < 2026-01-01",
        "joined <= 2026-01-01",
        "joined > 2026-01-01",
        "joined >= 2026-01-02",
        "joined = 2025-12-31",
    ]
)
EXPRESSIONS = st.recursive(
    TERMS,
    lambda inner: st.one_of(
        inner.map(lambda e: f"not {e}"),
        st.tuples(inner, st.sampled_from(["and", "or"]), inner).map(
            lambda t: f"({t[0]} {t[1]} {t[2]})"
        ),
    ),
    max_leaves=6,
)


@given(expression=EXPRESSIONS)
@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
def test_sql_selects_exactly_who_the_expression_means(
    population: tuple[Store, dict[int, set[str]]], expression: str
) -> None:
    store, tags_of = population
    segment = make_segment("s", expression)
    expected = {s.email for s in store.list_subscribers() if holds(segment.node, s, tags_of[s.id])}
    assert {s.email for s in store.list_subscribers(segment=segment)} == expected
    assert store.count(segment=segment) == len(expected)
    recipients = {
        s.email
        for s in store.list_subscribers(Status.ACTIVE, segment=segment)
        if "paused" not in tags_of[s.id]
    }
    assert {s.email for s in store.list_recipients(segment)} == recipients
    assert store.count_recipients(segment) == len(recipients)


def test_cli_list_and_count_by_segment(tmp_path: Path) -> None:
    ws = tmp_path / "ws"
    ws.mkdir()
    (ws / "newsletter.toml").write_text('[segments]\neurope = "tag:europe"\n', encoding="utf-8")
    args: list[Any] = ["-C", str(ws), "subscribers"]
    runner = CliRunner()
    for email in ("a@example.org", "b@example.org", "c@example.org"):
        runner.invoke(main, [*args, "add", email])
    runner.invoke(main, [*args, "tag", "a@example.org", "europe"])
    runner.invoke(main, [*args, "tag", "b@example.org", "europe", "paused"])
    listed = runner.invoke(main, [*args, "list", "--segment", "europe"])
    assert listed.stdout == "a@example.org\tactive\t\nb@example.org\tactive\t\n"
    counted = runner.invoke(main, [*args, "count", "--segment", "europe"])
    assert counted.exit_code == 0
    assert "active               2" in counted.stdout
    assert "recipients           1" in counted.stdout  # b paused
    unknown = runner.invoke(main, [*args, "list", "--segment", "asia"])
    assert unknown.exit_code == 1
    assert (
        unknown.stderr
        == "Error: no segment 'asia' in [segments]; define it there, or use one of: europe\n"
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[preferences]\ntopics = ["europe", "paused"]\n', "paused is the pause, not a topic"),
        ('[preferences]\ntopics = "europe"\n', "topics must be a list of tags or a table"),
        ('[preferences]\ntopics = ["a;b"]\n', "comma, semicolon"),
        ("[preferences]\ncolour = 1\n", "unknown key 'colour' in [preferences]"),
        ('[preferences]\npause = "no"\n', "pause must be true or false"),
    ],
)
def test_preferences_config_errors(tmp_path: Path, text: str, message: str) -> None:
    (tmp_path / "newsletter.toml").write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        config.load(tmp_path, environ={})
    assert str(info.value).startswith(f"{tmp_path / 'newsletter.toml'}:2: ")


def test_preferences_topics_as_a_list_or_with_labels(tmp_path: Path) -> None:
    path = tmp_path / "newsletter.toml"
    path.write_text('[preferences]\ntopics = ["Europe", "harbours"]\npause = false\n')
    prefs = config.load(tmp_path, environ={}).preferences
    assert prefs.topics == (("europe", "Europe"), ("harbours", "harbours")) and not prefs.pause
    path.write_text('[preferences.topics]\neurope = "News from  Europe"\n')
    prefs = config.load(tmp_path, environ={}).preferences
    assert prefs.topics == (("europe", "News from Europe"),) and prefs.pause
