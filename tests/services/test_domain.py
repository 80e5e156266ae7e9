"""SendRequest and SendResult: immutable values, a stable request digest, results that survive a
round trip through JSON (the idempotency store keeps them so)."""

from __future__ import annotations

import json

import pytest

from smtp_service.services.bounces import classify_smtp_error
from smtp_service.services.domain import Attachment, Bounce, SendRequest, SendResult


def _request(**overrides):
    fields = {
        "sender": "Sender <s@example.com>",
        "to": ["a@example.net"],
        "subject": "Hi",
        "text": "Hello",
    }
    return SendRequest(**{**fields, **overrides})


def test_requests_are_immutable_and_normalised():
    request = _request(cc=["c@example.net"], headers={"X-A": "1"},
                       attachments=[Attachment("a.txt", "text/plain", b"x")])
    assert request.to == ("a@example.net",) and request.cc == ("c@example.net",)
    assert request.headers == (("X-A", "1"),)
    assert isinstance(request.attachments, tuple)
    with pytest.raises(AttributeError):
        request.subject = "other"  # type: ignore[misc]
    assert request.recipient_count == 2


def test_equal_requests_have_equal_digests():
    assert _request().digest() == _request(to=("a@example.net",)).digest()
    assert _request(headers={"X-A": "1"}).digest() == _request(headers=[("X-A", "1")]).digest()
    assert _request().digest() == _request(track_opens=True).digest()  # the default, given


@pytest.mark.parametrize(
    "change",
    [
        {"sender": "s@example.com"},
        {"to": ["b@example.net"]},
        {"cc": ["a@example.net"]},
        {"bcc": ["a@example.net"]},
        {"reply_to": ["a@example.net"]},
        {"subject": "Hi!"},
        {"text": None, "html": "Hello"},
        {"headers": {"X-A": "1"}},
        {"track_opens": False},
        {"attachments": [Attachment("a.txt", "text/plain", b"x")]},
    ],
)
def test_any_difference_changes_the_digest(change):
    assert _request(**change).digest() != _request().digest()


def test_attachment_bytes_do_not_run_together():
    ab = [Attachment("a", "text/plain", b"ab"), Attachment("b", "text/plain", b"c")]
    a_bc = [Attachment("a", "text/plain", b"a"), Attachment("b", "text/plain", b"bc")]
    assert _request(attachments=ab).digest() != _request(attachments=a_bc).digest()


@pytest.mark.parametrize(
    "result",
    [
        SendResult(
            outcome="sent",
            message_id="m1@example.com",
            transport="custom",
            accepted=("a@example.net",),
            rejected=(classify_smtp_error("b@example.net", 550, "5.1.1 no such user"),),
        ),
        SendResult(
            outcome="bounced",
            message_id="m2@example.com",
            transport="global",
            rejected=(classify_smtp_error("b@example.net", 451, "4.7.1 later"),),
            bounce=Bounce("soft", 451, "4.7.1", ("b@example.net",)),
            error="SMTP server refused the message: 451 4.7.1 later",
        ),
        SendResult(
            outcome="failed",
            message_id="m3@example.com",
            transport="custom",
            error="SMTP send failed: connection closed",
            uncertain=True,
        ),
    ],
)
def test_results_survive_a_json_round_trip(result):
    stored = json.loads(json.dumps(result.to_dict()))
    assert SendResult.from_dict(stored) == result
    assert result.settled == (result.outcome == "sent" or result.uncertain)


def test_an_unknown_outcome_is_refused():
    data = SendResult(outcome="sent", message_id="m", transport="custom").to_dict()
    with pytest.raises(ValueError):
        SendResult.from_dict({**data, "outcome": "maybe"})
