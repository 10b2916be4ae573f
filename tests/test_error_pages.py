"""The service's error pages (404, 405, 413, 431, 500, ...) are the theme's
service/error.html in the newsletter's language, whether Flask or waitress refuses the
request, and say nothing about the server (no exception, limit or server name)."""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path

import pytest

from newsletter import server
from newsletter.config import Config
from newsletter.server import PAGE_CSP, create_app, start_server

WORDS = {
    "de": {
        404: ("Nicht gefunden", "Diese Seite gibt es nicht."),
        405: ("Nicht erlaubt", "Diese Seite kann so nicht verwendet werden."),
        413: ("Zu groß", "Was gesendet wurde, ist für diese Seite zu groß."),
        500: ("Etwas ist schiefgegangen", "Bei uns ist etwas schiefgegangen."),
        400: ("Ungültige Anfrage", "Die Anfrage war nicht lesbar."),
        431: ("Zu groß", "Was gesendet wurde, ist für diese Seite zu groß."),
        501: ("Nicht unterstützt", "Diese Seite kann auf diese Art von Anfrage nicht antworten."),
    },
    "fr": {
        404: ("Introuvable", "Cette page n’existe pas."),
        405: ("Non autorisé", "Cette page ne peut pas être utilisée de cette façon."),
        413: ("Trop volumineux", "Ce qui a été envoyé est trop volumineux pour cette page."),
        500: ("Une erreur s’est produite", "Une erreur s’est produite chez nous."),
        400: ("Requête invalide", "La requête n’a pas pu être lue."),
        431: ("Trop volumineux", "Ce qui a été envoyé est trop volumineux pour cette page."),
        501: ("Non pris en charge", "Cette page ne peut pas répondre à ce type de requête."),
    },
}
ERROR_WORD = {"de": "Fehler", "fr": "Erreur"}
# What Werkzeug and waitress would have said, and what no page may show.
LEAKS = (
    "Not Found",
    "Method Not Allowed",
    "Request Entity Too Large",
    "Internal Server Error",
    "Bad Request",
    "Not Implemented",
    "Header Fields",
    "requested URL",
    "max_body",
    "waitress",
    "newsletter",  # waitress's ident
    "werkzeug",
    "Traceback",
    "ZeroDivisionError",
    "division",
    "That did not work",
)


def in_language(cfg: Config, locale: str) -> Config:
    return dataclasses.replace(cfg, newsletter=dataclasses.replace(cfg.newsletter, locale=locale))


def assert_page(text: str, locale: str, code: int) -> None:
    title, message = WORDS[locale][code]
    assert f"<h1>{title}</h1>" in text and message in text, text[-600:]
    assert f"{ERROR_WORD[locale]} {code}" in text and f'lang="{locale}"' in text
    body = text[text.index("<body") :]
    for leak in LEAKS:
        assert leak.lower() not in body.lower(), leak


@pytest.mark.parametrize("locale", ["de", "fr"])
def test_what_flask_refuses_is_the_themes_page_in_the_newsletters_language(
    cfg: Config, tmp_path: Path, locale: str
) -> None:
    app = create_app(in_language(cfg, locale), tmp_path / "news.db")

    @app.get("/a-view-that-fails")
    def fails() -> str:  # an exception no handler expects
        return str(1 / 0)

    try:
        client = app.test_client()
        missing = client.get("/no-such-page/x")
        assert missing.status_code == 404
        assert_page(missing.get_data(as_text=True), locale, 404)
        wrong = client.put("/subscribe")
        assert wrong.status_code == 405
        assert_page(wrong.get_data(as_text=True), locale, 405)
        assert "POST" in wrong.headers["Allow"]  # Werkzeug's header stays
        assert wrong.headers["Content-Security-Policy"] == PAGE_CSP
        huge = client.post(
            "/subscribe",
            data=b"email=" + b"a" * 100_000,
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert huge.status_code == 413
        assert_page(huge.get_data(as_text=True), locale, 413)
        broken = client.get("/a-view-that-fails")
        assert broken.status_code == 500
        assert_page(broken.get_data(as_text=True), locale, 500)
    finally:
        server.close_app(app)


def raw_request(port: int, request: bytes) -> tuple[int, dict[str, str], str]:
    """Send ``request`` as it is and read the answer until the server closes."""
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as connection:
        connection.sendall(request)
        while True:
            try:
                chunk = connection.recv(65536)
            except ConnectionResetError:  # the server closes with our bytes unread
                break
            if not chunk:
                break
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    return int(status_line.split()[1]), headers, body.decode("utf-8")


@pytest.mark.server
@pytest.mark.parametrize("locale", ["de", "fr"])
def test_what_waitress_refuses_itself_is_the_themes_page_too(
    cfg: Config, tmp_path: Path, locale: str
) -> None:
    requests = {
        413: b"POST /subscribe HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n",
        431: b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 16_000 + b"\r\n\r\n",
        400: b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: many\r\n\r\n",
        501: b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
    }
    with start_server(create_app(in_language(cfg, locale), tmp_path / "news.db")) as running:
        for code, request in requests.items():
            status, headers, text = raw_request(running.port, request)
            assert status == code
            assert headers["content-type"] == "text/html; charset=utf-8"
            assert headers["content-security-policy"] == PAGE_CSP
            assert headers["x-content-type-options"] == "nosniff"
            assert int(headers["content-length"]) == len(text.encode("utf-8"))
            assert_page(text, locale, code)


@pytest.mark.server
def test_a_workspace_overrides_the_error_page(cfg: Config, workspace: Path, tmp_path: Path) -> None:
    own = workspace / "templates" / "service" / "error.html"
    own.parent.mkdir(parents=True)
    own.write_text(
        '{% extends "!default/service/base.html" %}{% block body %}'
        "<p>OURS {{ code }}: {{ message }}</p>{% endblock %}",
        encoding="utf-8",
    )
    with start_server(create_app(cfg, tmp_path / "news.db")) as running:
        app = running.app
        answer = app.test_client().put("/subscribe").get_data(as_text=True)
        assert "OURS 405: This page cannot be used this way." in answer
        status, _, text = raw_request(
            running.port, b"POST /subscribe HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n"
        )
        assert status == 413 and "OURS 413: What was sent is too large for this page." in text
