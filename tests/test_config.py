"""The workspace config: defaults, unknown keys, secrets kept out of the file and out of repr."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from newsletter import cli, config
from newsletter.config import (
    Config,
    DeliverySettings,
    NewsletterSettings,
    Secrets,
    SmtpSettings,
    UnsubscribeSettings,
    WebhookSettings,
)
from newsletter.errors import ConfigError


def write_config(root: Path, text: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    path = root / config.CONFIG_NAME
    path.write_text(text, encoding="utf-8")
    return path


def load_error(root: Path) -> str:
    with pytest.raises(ConfigError) as info:
        config.load(root, environ={})
    text = str(info.value)
    assert "\n" not in text
    return text


def test_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    write_config(tmp_path, "# nothing set\n")
    cfg = config.load(tmp_path, environ={})
    assert cfg.root == tmp_path.resolve()
    assert cfg.newsletter == NewsletterSettings()
    assert cfg.smtp == SmtpSettings()
    assert cfg.delivery == DeliverySettings()
    # The https unsubscribe link derives from the public address.
    assert cfg.unsubscribe == UnsubscribeSettings(url="https://example.org/newsletter/u")
    assert cfg.secrets == Secrets()
    assert cfg.newsletter.date_format == ""  # the locale's own short date
    assert cfg.state_dir == tmp_path.resolve() / ".newsletter"
    assert cfg.database.path == cfg.state_dir / "newsletter.db"
    assert cfg.sender_domain == "example.org"
    assert cfg.list_id == "My Newsletter <my-newsletter.example.org>"


def test_example_workspace_values(cfg: Config) -> None:
    assert cfg.newsletter.name == "The Harbour Ledger"
    assert cfg.newsletter.reply_to == "letters@example.org"
    assert cfg.smtp.port == 8025
    assert cfg.unsubscribe.url == "https://example.org/ledger/u"
    # Keys the file leaves out keep their defaults.
    assert cfg.newsletter.subject_max_length == NewsletterSettings().subject_max_length
    assert cfg.secrets.secret_key is not None


def test_ints_are_accepted_for_floats_but_strings_are_not_ints(tmp_path: Path) -> None:
    write_config(tmp_path, "[delivery]\nrate = 5\n")
    assert config.load(tmp_path, environ={}).delivery.rate == 5.0
    path = write_config(tmp_path, '[smtp]\nhost = "x"\nport = "25"\n')
    text = load_error(tmp_path)
    assert text.startswith(f"{path}:3: ")
    assert "port must be int, not str" in text


def test_unknown_key_names_the_key_and_its_line(tmp_path: Path) -> None:
    path = write_config(tmp_path, '[newsletter]\nname = "X"\n\nnmae = "Y"\n')
    text = load_error(tmp_path)
    assert text.startswith(f"{path}:4: ")
    assert "unknown key 'nmae' in [newsletter]" in text
    assert "name" in text.split(";", 1)[1]  # the hint lists the real keys


def test_unknown_section_names_the_section_and_its_line(tmp_path: Path) -> None:
    path = write_config(tmp_path, '[newsletter]\nname = "X"\n\n[smpt]\nhost = "h"\n')
    text = load_error(tmp_path)
    assert text.startswith(f"{path}:4: ")
    assert "unknown section [smpt]" in text


@pytest.mark.parametrize(
    ("section", "key", "env"),
    [
        ("smtp", "password", config.ENV_SMTP_PASSWORD),
        ("newsletter", "secret_key", config.ENV_SECRET_KEY),
        ("bounces", "imap_password", config.ENV_IMAP_PASSWORD),
        ("webhooks", "mailgun_signing_key", config.ENV_MAILGUN_SIGNING_KEY),
        ("webhooks", "signing_key", config.ENV_MAILGUN_SIGNING_KEY),
        ("webhooks", "postmark_password", config.ENV_POSTMARK_PASSWORD),
        ("webhooks", "sendgrid_public_key", config.ENV_SENDGRID_PUBLIC_KEY),
    ],
)
def test_secrets_in_the_file_are_refused_with_the_env_var(
    tmp_path: Path, section: str, key: str, env: str
) -> None:
    path = write_config(tmp_path, f'[{section}]\n{key} = "hunter2-do-not-print"\n')
    text = load_error(tmp_path)
    assert text.startswith(f"{path}:2: ")
    assert "secrets never go in the config file" in text
    assert env in text
    assert "hunter2" not in text


def test_bad_toml_names_file_and_line(tmp_path: Path) -> None:
    path = write_config(tmp_path, '[newsletter]\nname = "The Ledger"\ntagline = "unterminated\n')
    text = load_error(tmp_path)
    assert text.startswith(f"{path}:3: invalid TOML")
    assert "(at line" not in text


def test_non_utf8_config_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / config.CONFIG_NAME
    path.write_bytes(b'[newsletter]\nname = "caf\xe9"\n')
    assert load_error(tmp_path).startswith(f"{path}:2: not UTF-8")


@pytest.mark.parametrize("key", ["name", "sender", "reply_to", "list_id"])
def test_line_breaks_in_header_values_are_refused(tmp_path: Path, key: str) -> None:
    value = "a@example.org\\r\\nBcc: victim@example.com"
    if key == "sender":
        value = "X <a@example.org>\\nBcc: victim@example.com"
    path = write_config(tmp_path, f'[newsletter]\n{key} = "{value}"\n')
    text = load_error(tmp_path)
    assert text.startswith(f"{path}:2: ")
    assert "line break" in text


def test_sender_must_be_an_address(tmp_path: Path) -> None:
    write_config(tmp_path, '[newsletter]\nsender = "nobody"\n')
    assert "sender is not an email address" in load_error(tmp_path)


def test_secrets_repr_never_shows_values() -> None:
    secrets = Secrets.from_env(
        {
            config.ENV_SMTP_PASSWORD: "pw-aaaaaaaaaaaa",
            config.ENV_SECRET_KEY: "key-bbbbbbbbbbbb",
            config.ENV_IMAP_PASSWORD: "imap-cccccccccc",
            config.ENV_MAILGUN_SIGNING_KEY: "mg-dddddddddddd",
            config.ENV_POSTMARK_PASSWORD: "pm-eeeeeeeeeeee",
            config.ENV_SENDGRID_PUBLIC_KEY: "sg-ffffffffffff",
        }
    )
    assert secrets.smtp_password == "pw-aaaaaaaaaaaa"
    assert secrets.mailgun_signing_key == "mg-dddddddddddd"
    assert secrets.postmark_password == "pm-eeeeeeeeeeee"
    assert secrets.sendgrid_public_key == "sg-ffffffffffff"
    shown = f"{secrets!r} {secrets} {Config(root=Path('.'), secrets=secrets)!r}"
    for value in (
        "pw-aaaaaaaaaaaa",
        "key-bbbbbbbbbbbb",
        "imap-cccccccccc",
        "mg-dddddddddddd",
        "pm-eeeeeeeeeeee",
        "sg-ffffffffffff",
    ):
        assert value not in shown
    assert "postmark_password=<set>" in shown
    assert "smtp_password=<set>" in shown
    assert "dkim_key_file=None" in shown


def test_load_reads_secrets_only_from_the_given_environment(workspace: Path) -> None:
    cfg = config.load(workspace, environ={config.ENV_SECRET_KEY: "from-env-0123456789"})
    assert cfg.secrets.secret_key == "from-env-0123456789"
    assert config.load(workspace, environ={}).secrets.secret_key is None


def test_find_root_walks_up_and_fails_outside_a_workspace(workspace: Path, tmp_path: Path) -> None:
    deep = workspace / "issues" / "001-trams-ferries-benches" / "articles"
    assert config.find_root(deep) == workspace.resolve()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    with pytest.raises(ConfigError, match=r"no newsletter\.toml"):
        config.find_root(outside)


def test_init_workspace_creates_a_loadable_workspace_once(tmp_path: Path) -> None:
    root = tmp_path / "new"
    created = config.init_workspace(root, name="Harbour Notes")
    assert {p.name for p in created} >= {"newsletter.toml", "issues", "templates", ".gitignore"}
    cfg = config.load(root, environ={})
    assert cfg.newsletter.name == "Harbour Notes"
    assert ".newsletter/" in (root / ".gitignore").read_text(encoding="utf-8").splitlines()
    with pytest.raises(ConfigError, match="already exists"):
        config.init_workspace(root)


def test_secrets_are_invisible_to_field_by_field_printers() -> None:
    import dataclasses
    import pprint

    secrets = Secrets(smtp_password="hunter2-password", secret_key="k" * 32)
    assert not dataclasses.is_dataclass(secrets)
    assert "hunter2" not in pprint.pformat(secrets)
    assert "hunter2" not in pprint.pformat(vars(Config(root=Path("."), secrets=secrets)))
    changed = secrets.replace(imap_password="imap-secret")
    assert changed.imap_password == "imap-secret" and changed.smtp_password == "hunter2-password"
    with pytest.raises(AttributeError):
        secrets.smtp_password = "x"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("pattern", "problem"),
    [
        ("{bogus}", "unknown field {bogus}"),
        ("{month}/{day}/{yy", "not a valid pattern"),
        ("{0}", "unknown field {0}"),
        ("{year:%Y}", "takes no format spec"),
        ("{month.__class__}", "unknown field {month.__class__}"),
    ],
)
def test_a_bad_date_format_is_refused_when_the_config_loads(
    tmp_path: Path, pattern: str, problem: str
) -> None:
    (tmp_path / "newsletter.toml").write_text(
        f'[newsletter]\nname = "X"\ndate_format = "{pattern}"\n', encoding="utf-8"
    )
    with pytest.raises(ConfigError) as caught:
        config.load(tmp_path, environ={})
    assert "newsletter.toml:3: [newsletter] date_format: " in str(caught.value)
    assert problem in str(caught.value)


def test_a_database_in_a_folder_that_does_not_exist_is_refused(tmp_path: Path) -> None:
    (tmp_path / "newsletter.toml").write_text('[newsletter]\nname = "X"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path, environ={}, db=tmp_path / "typo" / "x.db")
    with pytest.raises(ConfigError, match="NEWSLETTER_DB"):
        config.load(tmp_path, environ={"NEWSLETTER_DB": str(tmp_path / "nope" / "x.db")})
    assert not (tmp_path / "typo").exists()
    assert (
        config.load(tmp_path, environ={}, db=tmp_path / "x.db").database.path == tmp_path / "x.db"
    )


def test_webhooks_section_reads_lists_and_names(tmp_path: Path) -> None:
    write_config(
        tmp_path,
        "[webhooks]\n"
        'ses_topic_arns = ["arn:aws:sns:us-east-1:123456789012:ses-feedback",\n'
        '                  "arn:aws-us-gov:sns:us-gov-west-1:123456789012:bounces.fifo"]\n'
        'postmark_username = "hooks"\n'
        'postmark_networks = ["50.31.156.0/24", "2001:db8::/32", "3.134.147.250"]\n',
    )
    cfg = config.load(tmp_path, environ={config.ENV_POSTMARK_PASSWORD: "pm-secret"})
    assert cfg.webhooks == WebhookSettings(
        ses_topic_arns=(
            "arn:aws:sns:us-east-1:123456789012:ses-feedback",
            "arn:aws-us-gov:sns:us-gov-west-1:123456789012:bounces.fifo",
        ),
        postmark_username="hooks",
        postmark_networks=("50.31.156.0/24", "2001:db8::/32", "3.134.147.250"),
    )
    assert cfg.secrets.postmark_password == "pm-secret"
    write_config(tmp_path, "# nothing\n")
    assert config.load(tmp_path, environ={}).webhooks == WebhookSettings()


@pytest.mark.parametrize(
    ("text", "line", "message"),
    [
        (
            'ses_topic_arns = ["arn:aws:sqs:us-east-1:123456789012:q"]',
            2,
            "'arn:aws:sqs:us-east-1:123456789012:q' is not an SNS topic ARN",
        ),
        ('ses_topic_arns = "arn:aws:sns:us-east-1:123456789012:t"', 2, "must be a list of strings"),
        ("ses_topic_arns = [1, 2]", 2, "must be a list of strings"),
        ('postmark_networks = ["50.31.156.0/33"]', 2, "is not an IP address or network"),
        ("postmark_username = 5", 2, "postmark_username must be str, not int"),
    ],
)
def test_bad_webhooks_values_name_the_key_and_line(
    tmp_path: Path, text: str, line: int, message: str
) -> None:
    path = write_config(tmp_path, f"[webhooks]\n{text}\n")
    error = load_error(tmp_path)
    assert error.startswith(f"{path}:{line}: [webhooks] ")
    assert message in error


# --- the one public address -------------------------------------------------------------------


def test_every_public_address_derives_from_base_url(tmp_path: Path) -> None:
    write_config(tmp_path, '[newsletter]\nbase_url = "https://news.example.org/letters/"\n')
    cfg = config.load(tmp_path, environ={})
    urls = cfg.public_urls
    assert urls.base == "https://news.example.org/letters"
    assert urls.home == "https://news.example.org/letters/"
    assert urls.issue("001-a") == "https://news.example.org/letters/001-a/"
    assert (
        urls.asset("001-a", "images/x.png") == "https://news.example.org/letters/001-a/images/x.png"
    )
    assert urls.feed == "https://news.example.org/letters/feed.xml"
    assert urls.subscribe == "https://news.example.org/letters/subscribe"
    assert urls.confirm == "https://news.example.org/letters/confirm"
    assert urls.path_prefix == "/letters" and urls.is_placeholder
    assert cfg.unsubscribe.url == "https://news.example.org/letters/u"


def test_init_writes_a_coherent_set(tmp_path: Path) -> None:
    config.init_workspace(tmp_path / "new")
    text = (tmp_path / "new" / config.CONFIG_NAME).read_text(encoding="utf-8")
    assert "url =" not in text.split("[unsubscribe]")[1]  # derived, not written twice
    cfg = config.load(tmp_path / "new", environ={})
    assert cfg.unsubscribe.url == cfg.public_urls.unsubscribe == f"{cfg.public_urls.base}/u"


def test_an_unsubscribe_url_that_disagrees_is_an_error_naming_the_key(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        '[newsletter]\nbase_url = "https://example.org/news"\n\n'
        '[unsubscribe]\nurl = "https://elsewhere.example.net/u"\n',
    )
    assert load_error(tmp_path) == (
        f"{path}:5: [unsubscribe] url must be https://example.org/news/u, derived from "
        '[newsletter] base_url; remove the line (it is derived), or write url = "" to send a '
        "mailto link only"
    )
    # Agreeing is fine (older configs), and "" turns the https link off.
    write_config(
        tmp_path,
        '[newsletter]\nbase_url = "https://example.org/news"\n[unsubscribe]\n'
        'url = "https://example.org/news/u"\n',
    )
    assert config.load(tmp_path, environ={}).unsubscribe.url == "https://example.org/news/u"
    write_config(tmp_path, '[unsubscribe]\nurl = ""\nmailto = "u@example.org"\n')
    assert config.load(tmp_path, environ={}).unsubscribe.url == ""


def test_the_old_archive_layout_gets_a_hint_with_the_value_to_write(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        '[newsletter]\nbase_url = "https://example.org/news/archive"\n\n'
        '[unsubscribe]\nurl = "https://example.org/news/u"\n',
    )
    assert load_error(tmp_path) == (
        f"{path}:2: [newsletter] base_url is the publication's address now, not its archive's; "
        'set base_url = "https://example.org/news" (old links under /archive/ keep working) '
        "and remove [unsubscribe] url"
    )


def test_server_public_url_must_agree_and_base_url_must_be_a_web_address(tmp_path: Path) -> None:
    path = write_config(
        tmp_path,
        '[newsletter]\nbase_url = "https://example.org/news"\n[server]\n'
        'public_url = "https://example.org/service"\n',
    )
    assert load_error(tmp_path).startswith(
        f"{path}:4: [server] public_url disagrees with [newsletter] base_url"
    )
    write_config(tmp_path, '[newsletter]\nbase_url = "example.org/news"\n')
    assert "base_url 'example.org/news' is not a web address" in load_error(tmp_path)
    write_config(tmp_path, '[newsletter]\nbase_url = "http://127.0.0.1:8080/news"\n')
    assert config.load(tmp_path, environ={}).unsubscribe.url == ""  # one-click needs https


def test_the_database_may_be_a_postgresql_url(workspace: Path) -> None:
    url = "postgresql://news@db.example.org:5432/news"
    cfg = config.load(workspace, environ={"NEWSLETTER_DB": url})
    assert cfg.database.is_postgres and str(cfg.database) == url
    assert config.load(workspace, environ={}, db=url).database.is_postgres


def test_a_password_in_the_database_url_is_refused_without_echoing_it(
    workspace: Path, runner: CliRunner
) -> None:
    url = "postgresql://news:hunter2@db.example.org/news"
    with pytest.raises(ConfigError) as caught:
        config.load(workspace, environ={"NEWSLETTER_DB": url})
    assert caught.value.where == "NEWSLETTER_DB" and "hunter2" not in str(caught.value)
    result = runner.invoke(cli.main, ["-C", str(workspace), "--db", url, "subscribers", "list"])
    assert result.exit_code == 1
    assert result.output.startswith("Error: --db: the database URL holds a password")
    assert "hunter2" not in result.output and "NEWSLETTER_DB_PASSWORD" in result.output


def test_a_bad_database_in_the_environment_names_the_variable(
    workspace: Path, runner: CliRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NEWSLETTER_DB", "postgresql://news@db.example.org:5432")
    result = runner.invoke(cli.main, ["-C", str(workspace), "subscribers", "list"])
    assert result.exit_code == 1
    assert result.output.startswith("Error: NEWSLETTER_DB: no database name")
