"""The edge's table: every domain error has an HTTP status, and its JSON body."""

from __future__ import annotations

import inspect

import pytest

from smtp_service import errors as edge
from smtp_service.services import errors as domain


def _domain_errors() -> list[type[domain.DomainError]]:
    return [
        cls
        for _name, cls in inspect.getmembers(domain, inspect.isclass)
        if issubclass(cls, domain.DomainError) and cls is not domain.DomainError
    ]


@pytest.mark.parametrize("kind", _domain_errors(), ids=lambda c: c.__name__)
def test_every_domain_error_has_a_status(kind):
    assert any(k in edge.STATUS for k in kind.__mro__), f"{kind.__name__} is not in STATUS"


def test_statuses_and_bodies():
    cases = [
        (domain.InvalidInput.field("to", "bad"), 400,
         {"error": "Validation failed", "details": {"to": ["bad"]}}),
        (domain.SenderNotVerified("a@x.example"), 403,
         {"error": "Sender a@x.example is not verified for this account"}),
        (domain.SenderNotFound("a@x.example"), 404, {"error": "Sender a@x.example not found"}),
        (domain.MessageNotFound("m1"), 404, {"error": "Message not found"}),
        (domain.SuppressionNotFound("a@x.example"), 404,
         {"error": "a@x.example is not suppressed"}),
        (domain.SenderExists("a@x.example"), 409, {"error": "Sender a@x.example already exists"}),
        (domain.IdempotencyPending(), 409,
         {"error": "A request with this Idempotency-Key is still being processed"}),
        (domain.MessageTooLarge(2000, 1024), 413,
         {"error": "Message is 2000 bytes; the limit is 1024"}),
        (domain.NoServerConfigured(), 503,
         {"error": "No SMTP server is configured for this account"}),
    ]
    for exc, status, body in cases:
        assert edge.status_of(exc) == status
        assert edge.error_body(exc) == body
    suppressed = domain.RecipientsSuppressed(["a@x.example", "b@x.example"])
    assert edge.status_of(suppressed) == 422
    assert edge.error_body(suppressed) == {
        "error": "Recipient a@x.example, b@x.example is on the suppression list (hard bounce); "
        "remove it with DELETE /api/suppressions/<email> to send again",
        "suppressed": ["a@x.example", "b@x.example"],
    }
