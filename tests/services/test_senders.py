"""SenderService: senders.json read through a per-worker cache checked against the file."""

from __future__ import annotations

import json
import os

import pytest

from smtp_service.services.errors import SenderExists, SenderNotFound
from smtp_service.services.senders import SENDERS_FILE, SenderService
from smtp_service.storage.files import AccountFiles


@pytest.fixture
def senders(tmp_path) -> SenderService:
    return SenderService(AccountFiles(str(tmp_path)))


def test_a_send_does_not_parse_an_unchanged_file_again(senders, monkeypatch):
    senders.add("acct-a", "Ceo@Example.com", "CEO")
    reads = []
    real_read = senders.files.read
    monkeypatch.setattr(
        senders.files, "read", lambda *a: reads.append(a) or real_read(*a)
    )
    for _ in range(3):
        assert senders.emails("acct-a") == {"ceo@example.com"}
    assert len(reads) == 1


def test_a_change_by_another_worker_is_seen_at_once(senders, tmp_path):
    senders.add("acct-a", "one@example.com", None)
    assert senders.emails("acct-a") == {"one@example.com"}
    other = SenderService(AccountFiles(str(tmp_path)))  # another worker, its own cache
    other.add("acct-a", "two@example.com", "Two")
    assert senders.emails("acct-a") == {"one@example.com", "two@example.com"}
    other.remove("acct-a", "one@example.com")
    assert [s.email for s in senders.list("acct-a")] == ["two@example.com"]
    os.unlink(senders.files.path("acct-a", SENDERS_FILE))
    assert senders.list("acct-a") == ()


def test_unreadable_files_and_odd_entries_give_no_senders(senders):
    path = senders.files.path("acct-a", SENDERS_FILE)
    os.makedirs(os.path.dirname(path))
    with open(path, "w") as handle:
        handle.write("{broken")
    assert senders.emails("acct-a") == frozenset()
    with open(path + ".tmp", "w") as handle:
        json.dump({"senders": [{"email": "ok@example.com"}, {"email": 3}, "x"]}, handle)
    os.replace(path + ".tmp", path)
    assert [(s.email, s.name, s.created_at) for s in senders.list("acct-a")] == [
        ("ok@example.com", None, None)
    ]


def test_domain_errors(senders):
    senders.add("acct-a", "one@example.com", None)
    with pytest.raises(SenderExists) as exists:
        senders.add("acct-a", "ONE@example.com", None)
    assert exists.value.message == "Sender ONE@example.com already exists"  # as given
    with pytest.raises(SenderNotFound) as missing:
        senders.remove("acct-a", "nobody@example.com")
    assert missing.value.message == "Sender nobody@example.com not found"
    with pytest.raises(SenderNotFound) as long_one:
        senders.remove("acct-a", "x" * 400)
    assert long_one.value.message == f"Sender {'x' * 100}... not found"
