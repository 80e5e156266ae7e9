"""GET /api/messages/stats and GET /api/messages against the real app on both engines: the stats
equal what was really sent, bounced (550 5.1.1 and 552 5.2.2 from a real SMTP server on
loopback), failed (a dead server) and opened (through the real pixel route); pages walk every
message once; another account's messages are never counted or listed; bad parameters are 400s
in the service's JSON shape."""

from __future__ import annotations

import math
import re
from fractions import Fraction
from typing import Any

import pytest

from tests.conftest import SMTP_USER, settings_body
from tests.e2e.conftest import free_port as _free_port

SEND = "/api/messages/send-email"
STATS = "/api/messages/stats"
LIST = "/api/messages"


def _use(client, headers, server=None, *, port: int | None = None):
    """Point the account at `server`, or at a `port` of localhost where nothing listens."""
    body = (
        settings_body(server)
        if server is not None
        else {
            "host": "localhost",
            "port": port,
            "user": SMTP_USER,
            "pass": "unused-password",
        }
    )
    r = client.post("/api/smtp/settings", json=body, headers=headers)
    assert r.status_code == 200, r.json


def _send(client, headers, to, *, html: bool = False, status: int = 200) -> str:
    body: dict[str, Any] = {"from": SMTP_USER, "to": to, "subject": "Statement"}
    body.update({"html": "<p>Your statement</p>"} if html else {"text": "Your statement"})
    r = client.post(SEND, json=body, headers=headers)
    assert r.status_code == status, r.json
    return r.json["messageId"]


def _pixel(server, message_id: str) -> str:
    for received in server.messages:
        if received.message["Message-ID"] == f"<{message_id}>":
            html = [p for p in received.message.walk() if p.get_content_type() == "text/html"]
            return re.search(r'src="[^"]*(/t/open/[^"]+\.gif)"', html[0].get_content()).group(1)
    raise AssertionError(f"{message_id} was not received")


def _walk(client, headers, **params) -> list[dict[str, Any]]:
    seen, cursor = [], None
    while True:
        query = {**params, **({"cursor": cursor} if cursor else {})}
        r = client.get(LIST, query_string=query, headers=headers)
        assert r.status_code == 200, r.json
        seen += r.json["messages"]
        cursor = r.json["nextCursor"]
        if cursor is None:
            return seen


def _nearest_rank(values: list[float], p: str) -> float:
    ordered = sorted(values)
    return ordered[math.ceil(Fraction(p) * len(ordered)) - 1]


@pytest.fixture
def app_config(app_config, servers):
    """Servers start before the app (and stop after its pool QUITs)."""
    return app_config


def test_stats_equal_what_was_sent_bounced_failed_and_opened(client, tokens, servers):
    a, b = tokens.headers("acct-a"), tokens.headers("acct-b")
    server = servers()
    server.handler.rcpt_replies["carol"] = (
        "552 5.2.2 <carol@example.net>: Recipient address rejected: Mailbox full"
    )
    _use(client, a, server)
    _use(client, b, server)
    opened_twice = _send(client, a, "ok1@example.net", html=True)
    opened_once = _send(client, a, "ok2@example.net", html=True)
    _send(client, a, ["ok3@example.net", "bad-user@example.net"], html=True)  # 1 hard, sent
    _send(client, a, "bad-two@example.net", status=502)  # 550 5.1.1: bounced, 1 hard
    _send(client, a, "carol@example.net", status=502)  # 552 5.2.2: bounced, 1 soft
    _send(client, a, ["ok4@example.net", "carolyn@example.net"])  # sent, 1 soft
    _send(client, b, "ok5@example.net", html=True)  # another account's
    _use(client, a, port=_free_port())  # nothing listens there: the send fails
    r = client.post(
        SEND,
        json={"from": SMTP_USER, "to": "ok6@example.net", "subject": "x", "text": "x"},
        headers=a,
    )
    assert r.status_code == 502 and r.json["bounce"] is None, r.json

    for agent in ("Mail/1.0", "Outlook/16"):  # two readers
        assert (
            client.get(_pixel(server, opened_twice), headers={"User-Agent": agent}).status_code
            == 200
        )
    assert client.get(_pixel(server, opened_once)).status_code == 200
    assert client.get(_pixel(server, opened_once)).status_code == 200  # same reader: not counted

    r = client.get(STATS, headers=a)
    assert r.status_code == 200, r.json
    total = r.json["total"]
    expected = {
        "messages": 7,
        "sent": 4,
        "failed": 1,
        "bounced": 2,
        "hardBounces": 2,
        "softBounces": 2,
        "tracked": 3,
        "opened": 2,
        "opens": 3,
        "openRate": 2 / 3,
    }
    assert {k: total[k] for k in expected} == expected
    # every count of the total is the sum of its intervals, and one day holds them all
    assert r.json["interval"] == "day" and len(r.json["intervals"]) == 8
    for name in expected:
        if name != "openRate":
            assert sum(p[name] for p in r.json["intervals"]) == total[name], name
    assert [p["messages"] for p in r.json["intervals"]].count(0) == 7
    # the percentiles are those of the sent messages' durations as the log holds them
    listed = _walk(client, a)
    sent = [m["durationMs"] for m in listed if m["status"] == "sent"]
    assert len(sent) == 4
    assert total["latencyMs"] == {f"p{p}": _nearest_rank(sent, f"0.{p}") for p in (50, 95, 99)}

    # the other account sees only its own message
    other = client.get(STATS, headers=b).json["total"]
    assert (other["messages"], other["sent"], other["tracked"], other["opened"]) == (1, 1, 1, 0)
    assert [m["recipients"] for m in _walk(client, b)] == [["ok5@example.net"]]
    # hour intervals count the same
    hours = client.get(STATS, query_string={"interval": "hour"}, headers=a).json
    assert len(hours["intervals"]) == 169 and hours["total"]["messages"] == 7


def test_the_listing_pages_and_filters(client, tokens, servers):
    a, b = tokens.headers("acct-a"), tokens.headers("acct-b")
    server = servers()
    _use(client, a, server)
    _use(client, b, server)
    ids = [_send(client, a, f"ok{i}@example.net") for i in range(5)]
    bounced = _send(client, a, "bad-one@example.net", status=502)
    theirs = _send(client, b, "ok0@example.net")

    walked = _walk(client, a, limit=2)
    assert [m["messageId"] for m in walked] == [bounced, *reversed(ids)]
    assert all("events" not in m for m in walked)
    record = client.get(f"/api/messages/{ids[0]}", headers=a).json
    del record["events"]
    assert walked[-1] == record  # the record's shape, without events
    assert theirs not in {m["messageId"] for m in walked}

    assert [m["messageId"] for m in _walk(client, a, status="bounced")] == [bounced]
    assert [m["messageId"] for m in _walk(client, a, to="OK3@Example.NET")] == [ids[3]]
    assert len(_walk(client, a, **{"from": SMTP_USER.upper()})) == 6
    assert _walk(client, a, **{"from": "other@example.com"}) == []

    page = client.get(LIST, query_string={"limit": 1}, headers=a).json
    assert len(page["messages"]) == 1 and page["nextCursor"]
    # the cursor is the account's own: another account cannot continue it
    r = client.get(LIST, query_string={"cursor": page["nextCursor"]}, headers=b)
    assert r.status_code == 400 and list(r.json["details"]) == ["cursor"]
    default = client.get(LIST, headers=a).json
    assert len(default["messages"]) == 6 and default["nextCursor"] is None


def test_stats_is_not_a_message_id(client, tokens):
    """/api/messages/stats is the stats route; an unknown id is still a 404."""
    r = client.get(STATS, headers=tokens.headers())
    assert r.status_code == 200 and "intervals" in r.json
    assert client.get("/api/messages/stats2", headers=tokens.headers()).status_code == 404


@pytest.mark.parametrize(
    ("path", "query", "field"),
    [
        (STATS, {"from": "yesterday"}, "from"),
        (STATS, {"to": "2026-13-01T00:00:00Z"}, "to"),
        (STATS, {"from": "2026-11-29T10:00:00 01:00"}, "from"),  # an unencoded + in a URL
        (STATS, {"from": "2026-11-29T00:00:00Z", "to": "2026-11-28T00:00:00Z"}, "to"),
        (STATS, {"from": "2026-11-29T00:00:00Z", "to": "2026-11-29T00:00:00Z"}, "to"),
        (STATS, {"from": "2020-01-01T00:00:00Z", "to": "2026-01-01T00:00:00Z"}, "to"),
        (STATS, {"from": "2026-01-01", "interval": "hour"}, "to"),
        (STATS, {"from": "1960-01-01T00:00:00Z", "to": "1960-01-02T00:00:00Z"}, "from"),
        (STATS, {"to": "9999-12-31T23:00:00Z"}, "to"),  # its day would end in year 10000
        (STATS, {"from": "9999-12-31T00:00:00Z", "to": "9999-12-31T01:00:00Z"}, "from"),
        (STATS, {"interval": "week"}, "interval"),
        (STATS, {"from": "x" * 100}, "from"),
        (STATS, {"window": "1"}, "window"),
        (LIST, {"status": "delivered"}, "status"),
        (LIST, {"limit": "0"}, "limit"),
        (LIST, {"limit": "201"}, "limit"),
        (LIST, {"limit": "1.5"}, "limit"),
        (LIST, {"limit": "-3"}, "limit"),
        (LIST, {"to": ""}, "to"),
        (LIST, {"to": "a\x00@example.net"}, "to"),
        (LIST, {"from": "a" * 321}, "from"),
        (LIST, {"cursor": "not-a-cursor"}, "cursor"),
        (LIST, {"cursor": "WzEsIngiXQ.forged"}, "cursor"),
        (LIST, [("status", "sent"), ("status", "failed")], "status"),
    ],
)
def test_bad_parameters_are_400s_naming_the_field(client, tokens, path, query, field):
    r = client.get(path, query_string=query, headers=tokens.headers())
    assert r.status_code == 400, r.json
    assert r.is_json and r.json["error"] == "Validation failed"
    assert list(r.json["details"]) == [field], r.json


@pytest.mark.parametrize(
    ("query", "start", "end"),
    [
        (
            {"to": "1970-01-01T00:00:00.001Z"},
            "1970-01-01T00:00:00.000Z",
            "1970-01-02T00:00:00.000Z",
        ),
        ({"to": "9999-12-30T23:59:59Z"}, "9999-12-23T00:00:00.000Z", "9999-12-31T00:00:00.000Z"),
        (
            {"from": "2026-11-29T10:00:00%2B01:00".replace("%2B", "+"), "interval": "hour"},
            "2026-11-29T09:00:00.000Z",
            None,
        ),
        (
            {"from": "2026-11-29", "to": "2026-11-30"},
            "2026-11-29T00:00:00.000Z",
            "2026-11-30T00:00:00.000Z",
        ),
    ],
)
def test_ranges_at_the_edges_are_answered(client, tokens, query, start, end):
    r = client.get(STATS, query_string=query, headers=tokens.headers())
    assert r.status_code == 200, r.json
    assert r.json["from"] == start and (end is None or r.json["to"] == end)


def test_both_routes_need_a_token(client):
    for path in (STATS, LIST):
        r = client.get(path)
        assert r.status_code == 401 and r.is_json


def test_the_openapi_document_describes_both_routes(client):
    doc = client.get("/api/openapi.json").json
    stats_op = doc["paths"]["/api/messages/stats"]["get"]
    list_op = doc["paths"]["/api/messages"]["get"]
    assert {p["name"] for p in stats_op["parameters"]} == {"from", "to", "interval"}
    assert {p["name"] for p in list_op["parameters"]} == {"status", "to", "from", "limit", "cursor"}
    assert all(p["in"] == "query" for p in stats_op["parameters"] + list_op["parameters"])
    assert set(stats_op["responses"]) == {"200", "400", "401"}
    assert stats_op["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/MessageStatsResponse"
    }
    period = doc["components"]["schemas"]["StatsPeriod"]["properties"]
    assert {"hardBounces", "softBounces", "openRate", "latencyMs"} <= set(period)
