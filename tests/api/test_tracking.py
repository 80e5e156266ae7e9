"""Open tracking that cannot break the message or the database (issue 11): the pixel lands
before the last </body> of the html as given, opens are counted once per reader and window and
capped per message, the pixel is rate-limited per client address, and tracking is off until
PUBLIC_BASE_URL says where readers reach the service."""

from __future__ import annotations

import logging
import re

import pytest

from smtp_service import create_app
from smtp_service.services import mailer as mailer_module
from tests.conftest import SMTP_USER, settings_body

SEND = "/api/messages/send-email"


@pytest.fixture
def own(client, tokens, smtp_server):
    r = client.post("/api/smtp/settings", json=settings_body(smtp_server), headers=tokens.headers())
    assert r.status_code == 200, r.json
    return smtp_server


def send_html(client, tokens, html):
    body = {"from": SMTP_USER, "to": "rcpt@example.net", "subject": "Hi", "html": html}
    r = client.post(SEND, json=body, headers=tokens.headers())
    assert r.status_code == 200, r.json
    return r.json["messageId"]


def html_received(server) -> str:
    part = [p for p in server.messages[-1].message.walk() if p.get_content_type() == "text/html"]
    return part[0].get_content()


PIXEL = re.compile(r'<img src="[^"]*/t/open/[^"]+\.gif"[^>]*/>')


@pytest.mark.parametrize(
    "html",
    [
        "<html><body><p>İİİİİİ İstanbul</p></body></html>",  # lower() makes each İ two chars
        "<HTML><BODY>ẞ straße ﬁ</BODY ></HTML>",
        "<body>first</body><!-- quoted </body> -->x</body>\n</html>",
        "<p>no body tag at all: İ</p>",
    ],
)
def test_the_pixel_lands_before_the_last_body_end_of_the_html_as_given(client, tokens, own, html):
    send_html(client, tokens, html)
    got = html_received(own).replace("\r\n", "\n").rstrip("\n")
    html = html.rstrip("\n")
    pixel = PIXEL.search(got)
    assert pixel, got
    assert got[: pixel.start()] + got[pixel.end() :] == html  # nothing else changed
    ends = [m.start() for m in re.finditer(r"</body\s*>", html, re.IGNORECASE)]
    assert pixel.start() == (ends[-1] if ends else len(html))


def pixel_path(server) -> str:
    return re.search(r'src="[^"]*(/t/open/[^"]+\.gif)"', html_received(server)).group(1)


def record(client, tokens, message_id):
    return client.get(f"/api/messages/{message_id}", headers=tokens.headers()).json


def test_an_open_is_counted_once_per_reader_and_window(app, client, tokens, own):
    message_id = send_html(client, tokens, "<p>x</p>")
    path = pixel_path(own)
    for _ in range(50):
        assert client.get(path, headers={"User-Agent": "Mail/1.0"}).status_code == 200
    got = record(client, tokens, message_id)
    assert got["opens"] == 1
    opens = [e for e in got["events"] if e["type"] == "open"]
    assert len(opens) == 1 and set(opens[0]["detail"]) == {"reader"}

    # another worker (its memory empty) asks the database, which says the same
    services = app.extensions["smtp_service"]
    services.mailer.tracker._recent.clear()
    assert client.get(path, headers={"User-Agent": "Mail/1.0"}).status_code == 200
    assert record(client, tokens, message_id)["opens"] == 1

    # after the window, the same reader counts again
    clock = services.database._clock
    services.database._clock = lambda: clock() + mailer_module.OPEN_WINDOW_SECONDS + 1
    services.mailer.tracker._recent.clear()
    assert client.get(path, headers={"User-Agent": "Mail/1.0"}).status_code == 200
    assert record(client, tokens, message_id)["opens"] == 2


def test_opens_per_message_are_capped(client, tokens, own, monkeypatch):
    monkeypatch.setattr(mailer_module, "MAX_OPENS", 3)
    message_id = send_html(client, tokens, "<p>x</p>")
    path = pixel_path(own)
    for reader in range(10):
        assert client.get(path, headers={"User-Agent": f"reader-{reader}"}).status_code == 200
    got = record(client, tokens, message_id)
    assert got["opens"] == 3
    assert [e["type"] for e in got["events"]].count("open") == 3


def test_the_pixel_is_rate_limited_per_client_address(app_config, tokens, smtp_server):
    app = create_app({**app_config, "TRACKING_RATE_LIMIT": "5 per minute"})
    client = app.test_client()
    try:
        for _ in range(5):
            assert client.get("/t/open/forged.gif").status_code == 200
        r = client.get("/t/open/forged.gif")
        assert r.status_code == 429 and r.json == {"error": "Too many requests"}
        other = client.get("/t/open/forged.gif", environ_base={"REMOTE_ADDR": "192.0.2.7"})
        assert other.status_code == 200 and other.mimetype == "image/gif"
    finally:
        app.extensions["smtp_service"].database.dispose()


def test_tracking_is_off_without_public_base_url(app_config, tokens, smtp_server, caplog):
    config = {k: v for k, v in app_config.items() if k != "PUBLIC_BASE_URL"}
    with caplog.at_level(logging.WARNING):
        app = create_app(config)
    assert "PUBLIC_BASE_URL is not set: open tracking is off" in caplog.text
    client = app.test_client()
    try:
        r = client.post("/api/smtp/settings", json=settings_body(smtp_server),
                        headers=tokens.headers())
        assert r.status_code == 200
        send_html(client, tokens, "<html><body>x</body></html>")
        assert html_received(smtp_server).rstrip("\r\n") == "<html><body>x</body></html>"
        assert b"/t/open/" not in smtp_server.messages[-1].data
    finally:
        app.extensions["smtp_service"].pool.close_all()
        app.extensions["smtp_service"].database.dispose()


def test_a_bad_rate_limit_stops_start_up(app_config):
    from smtp_service.config import ConfigError

    with pytest.raises(ConfigError, match="TRACKING_RATE_LIMIT"):
        create_app({**app_config, "TRACKING_RATE_LIMIT": "lots"})
