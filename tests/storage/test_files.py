"""AccountFiles against the real file system: modes, atomic replace under SIGKILL, the per-document
lock across processes, account id validation and update() semantics.

Child processes are plain `python -c` subprocesses that load files.py by its path (no fork in a
threaded pytest process, and no import of the whole app, which keeps each start short).
"""

from __future__ import annotations

import json
import os
import random
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import filelock
import pytest

import smtp_service.storage.files as files_module
from smtp_service.storage.files import DELETE, AccountFiles, InvalidAccountId

FILES_PY = files_module.__file__
DOC = "doc.json"
TEMP_NAME = re.compile(r"^\.doc\.json\.tmp-[a-z0-9_]{8}$")

# Loads files.py by its path in a child process; argv[1] is DATA_DIR.
CHILD_PRELUDE = f"""
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("files_under_test", {FILES_PY!r})
files_module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(files_module)
files = files_module.AccountFiles(sys.argv[1])
"""

# A document that is a function of its sequence number, several hundred KB and of varying size,
# so a torn or mixed file cannot pass for a complete one. Shared by the writer child and the test.
DOCUMENT_SOURCE = """
def document(seq):
    return {"seq": seq, "payload": f"{seq:08d}" * (50_000 + (seq % 7) * 10_000), "end": seq}
"""
_namespace: dict = {}
exec(DOCUMENT_SOURCE, _namespace)
document = _namespace["document"]

WRITER_CHILD = (
    CHILD_PRELUDE
    + DOCUMENT_SOURCE
    + """
def bump(current):
    return document(current["seq"] + 1 if current else 0)

files.update("acct-crash", "doc.json", bump)
print("ready", flush=True)
while True:
    files.update("acct-crash", "doc.json", bump)
"""
)

COUNTER_CHILD = (
    CHILD_PRELUDE
    + """
def increment(current):
    current = current or {"counter": 0}
    return {**current, "counter": current["counter"] + 1}

print("ready", flush=True)
assert sys.stdin.readline() == "go\\n"
for _ in range(int(sys.argv[2])):
    files.update("acct-shared", "counter.json", increment)
print("done", flush=True)
"""
)

HOLDER_CHILD = (
    CHILD_PRELUDE
    + """
def hold(current):
    print("holding", flush=True)
    assert sys.stdin.readline() == "release\\n"
    return {"written-by": "holder"}

files.update("acct-a", "doc.json", hold)
print("done", flush=True)
"""
)


def _child(source: str, *args: str, stdin: bool = False) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", source, *args],
        stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
    )


def _mode(path: str | Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    return tmp_path / "data"


@pytest.fixture
def files(data_dir: Path) -> AccountFiles:
    return AccountFiles(str(data_dir))


@pytest.fixture
def short_lock_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """A lock left held by a bug fails the test in a second instead of ten."""
    monkeypatch.setattr(files_module, "LOCK_TIMEOUT_SECONDS", 1.0)


# -- modes ------------------------------------------------------------------------------------


@pytest.mark.usefixtures("umask_zero")
def test_folders_are_0700_and_files_0600_whatever_the_umask(files, data_dir):
    files.write("acct-1", DOC, {"a": 1})

    assert _mode(data_dir) == 0o700
    assert _mode(data_dir / "shared-data") == 0o700
    assert _mode(data_dir / "shared-data" / "acct-1") == 0o700
    assert _mode(data_dir / "shared-data" / "acct-1" / DOC) == 0o600
    assert _mode(data_dir / "shared-data" / "acct-1" / (DOC + ".lock")) == 0o600

    files.write("acct-1", DOC, {"a": 2})  # a rewrite is a new file: still 0600
    files.write("acct-2", DOC, {"b": 1})  # a second account below an existing root
    assert _mode(data_dir / "shared-data" / "acct-1" / DOC) == 0o600
    assert _mode(data_dir / "shared-data" / "acct-2") == 0o700
    assert _mode(data_dir / "shared-data" / "acct-2" / DOC) == 0o600


@pytest.mark.usefixtures("umask_zero")
def test_shared_data_root_is_0700_when_data_dir_already_exists(files, data_dir):
    data_dir.mkdir(mode=0o755)
    files.write("acct-1", DOC, {"a": 1})
    assert _mode(data_dir / "shared-data") == 0o700
    assert _mode(data_dir) == 0o755  # an existing folder's mode is the operator's choice


# -- reading and writing ----------------------------------------------------------------------


def test_round_trip_through_a_second_instance(files, data_dir):
    doc = {"host": "smtp.example.com", "port": 587, "name": "Zoë ✉", "list": [1, None, True]}
    files.write("acct-1", DOC, doc)
    assert AccountFiles(str(data_dir)).read("acct-1", DOC) == doc
    with open(files.path("acct-1", DOC), encoding="utf-8") as handle:
        assert json.load(handle) == doc


def test_missing_documents_and_accounts_read_as_none(files):
    assert files.read("acct-none", DOC) is None
    assert files.accounts() == []


def test_unparseable_document_raises_value_error(files):
    files.write("acct-1", DOC, {"a": 1})
    Path(files.path("acct-1", DOC)).write_bytes(b'{"a": 1')
    with pytest.raises(ValueError):
        files.read("acct-1", DOC)
    Path(files.path("acct-1", DOC)).write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(ValueError):
        files.read("acct-1", DOC)


def test_accounts_lists_only_valid_account_folders(files, data_dir):
    for account in ("acct-b", "acct-a", "A1"):
        files.write(account, DOC, {})
    root = data_dir / "shared-data"
    (root / ".hidden").mkdir()
    (root / "bad.name").mkdir()
    (root / "not-a-folder").write_text("x")
    assert files.accounts() == ["A1", "acct-a", "acct-b"]


# -- account ids ------------------------------------------------------------------------------

BAD_IDS = [
    "",
    "..",
    "../x",
    "../../etc",
    "a/b",
    "a\\b",
    "/etc",
    ".hidden",
    "-leading-dash",
    "_leading-underscore",
    "a.b",
    "a b",
    "a\n",
    "a\x00b",
    "é",
    "a" * 65,
    "x" * 10_000,
    None,
    42,
]


@pytest.mark.parametrize("account_id", BAD_IDS, ids=repr)
def test_bad_account_ids_are_refused_and_touch_no_file(tmp_path, data_dir, files, account_id):
    files.write("acct-ok", DOC, {"ok": True})
    outside = data_dir / "x"  # where "../x" would land
    before = _tree(tmp_path)

    for call in (
        lambda: files.folder(account_id),
        lambda: files.path(account_id, DOC),
        lambda: files.read(account_id, DOC),
        lambda: files.write(account_id, DOC, {"evil": True}),
        lambda: files.update(account_id, DOC, lambda _doc: {"evil": True}),
        lambda: files.delete(account_id, DOC),
    ):
        with pytest.raises(InvalidAccountId):
            call()

    assert _tree(tmp_path) == before
    assert not outside.exists()
    assert files.accounts() == ["acct-ok"]


@pytest.mark.parametrize("account_id", ["a", "0", "A" * 64, "acct_1-B"])
def test_boundary_account_ids_are_accepted(files, account_id):
    files.write(account_id, DOC, {"id": account_id})
    assert files.read(account_id, DOC) == {"id": account_id}
    assert files.accounts() == [account_id]


# -- update() semantics -----------------------------------------------------------------------


def test_returning_the_same_object_writes_nothing(files):
    files.write("acct-1", DOC, {"n": 1})
    path = files.path("acct-1", DOC)
    before = os.stat(path)
    entries = sorted(os.listdir(files.folder("acct-1")))
    seen = []

    def unchanged(doc):
        seen.append(doc)
        return doc

    assert files.update("acct-1", DOC, unchanged) == {"n": 1}
    after = os.stat(path)
    assert seen == [{"n": 1}]
    assert (after.st_ino, after.st_mtime_ns, after.st_size) == (
        before.st_ino,
        before.st_mtime_ns,
        before.st_size,
    )
    assert sorted(os.listdir(files.folder("acct-1"))) == entries


def test_returning_none_for_a_missing_document_writes_nothing(files):
    assert files.update("acct-1", DOC, lambda doc: doc) is None
    assert not os.path.exists(files.path("acct-1", DOC))


def test_an_equal_but_new_object_is_written(files):
    files.write("acct-1", DOC, {"n": 1})
    inode = os.stat(files.path("acct-1", DOC)).st_ino
    files.update("acct-1", DOC, lambda doc: dict(doc))
    assert os.stat(files.path("acct-1", DOC)).st_ino != inode  # replaced by a new file


def test_update_sees_the_current_document_and_stores_the_result(files):
    files.write("acct-1", DOC, {"n": 1})
    result = files.update("acct-1", DOC, lambda doc: {"n": doc["n"] + 1})
    assert result == {"n": 2}
    assert files.read("acct-1", DOC) == {"n": 2}


def test_delete_sentinel_removes_the_document(files):
    files.write("acct-1", DOC, {"n": 1})
    files.write("acct-1", "other.json", {"keep": True})
    assert files.update("acct-1", DOC, lambda _doc: DELETE) is DELETE
    assert files.read("acct-1", DOC) is None
    assert not os.path.exists(files.path("acct-1", DOC))
    assert files.read("acct-1", "other.json") == {"keep": True}
    assert files.update("acct-1", DOC, lambda _doc: DELETE) is DELETE  # nothing there: no error


def test_delete_reports_whether_there_was_a_document(files):
    files.write("acct-1", DOC, {"n": 1})
    assert files.delete("acct-1", DOC) is True
    assert files.delete("acct-1", DOC) is False
    assert files.read("acct-1", DOC) is None


def test_a_corrupt_document_reaches_change_as_none_and_is_replaced(files):
    files.write("acct-1", DOC, {"n": 1})
    Path(files.path("acct-1", DOC)).write_text("{torn")
    seen = []

    def change(doc):
        seen.append(doc)
        return {"fresh": True}

    files.update("acct-1", DOC, change)
    assert seen == [None]
    assert files.read("acct-1", DOC) == {"fresh": True}


@pytest.mark.usefixtures("short_lock_timeout")
def test_a_failing_change_leaves_the_document_and_releases_the_lock(files):
    files.write("acct-1", DOC, {"n": 1})

    def boom(_doc):
        raise RuntimeError("change failed")

    with pytest.raises(RuntimeError, match="change failed"):
        files.update("acct-1", DOC, boom)
    assert files.read("acct-1", DOC) == {"n": 1}
    files.write("acct-1", DOC, {"n": 2})  # would time out if the lock were still held
    assert files.read("acct-1", DOC) == {"n": 2}


@pytest.mark.usefixtures("short_lock_timeout")
def test_an_unserializable_document_leaves_the_old_one_and_no_temp_file(files):
    files.write("acct-1", DOC, {"n": 1})
    entries = sorted(os.listdir(files.folder("acct-1")))
    with pytest.raises(TypeError):
        files.write("acct-1", DOC, {"n": object()})
    assert files.read("acct-1", DOC) == {"n": 1}
    assert sorted(os.listdir(files.folder("acct-1"))) == entries
    files.write("acct-1", DOC, {"n": 3})
    assert files.read("acct-1", DOC) == {"n": 3}


def test_stale_temp_files_of_the_document_are_removed_on_its_next_write(files):
    files.write("acct-1", DOC, {"n": 1})
    files.write("acct-1", "other.json", {"o": 1})
    folder = Path(files.folder("acct-1"))
    stale = folder / ".doc.json.tmp-ab12cd_9"  # as a writer killed before its replace leaves it
    stale.write_text('{"half": ')
    others = [folder / ".other.json.tmp-ab12cd_9", folder / ".doc.json.tmp-notmine", folder / "x"]
    for path in others:
        path.write_text("keep")

    assert files.read("acct-1", DOC) == {"n": 1}  # a temp file is never read as the document
    files.update("acct-1", DOC, lambda doc: doc)  # no write: nothing removed either
    assert stale.exists()

    files.write("acct-1", DOC, {"n": 2})
    assert not stale.exists()
    assert all(path.read_text() == "keep" for path in others)
    assert not [e for e in os.listdir(folder) if TEMP_NAME.match(e)]

    stale.write_text("")
    assert files.delete("acct-1", DOC) is True
    assert not stale.exists()


# -- crash safety -----------------------------------------------------------------------------


def test_sigkill_during_writes_never_leaves_a_torn_document(files, data_dir):
    """A child rewrites a large document in a loop and is SIGKILLed at random moments: the
    document is always a complete one at least as new as before, and temp files do not pile up."""
    rng = random.Random()
    folder = Path(files.path("acct-crash", DOC)).parent
    last_seq = -1
    kills_mid_write = 0
    deadline = time.monotonic() + 10

    for round_number in range(25):
        if time.monotonic() > deadline and round_number >= 10:
            break
        with _child(WRITER_CHILD, str(data_dir)) as child:
            assert child.stdout.readline() == b"ready\n"  # it has written at least once
            time.sleep(rng.uniform(0, 0.04))  # a random moment in the write loop, not a check
            child.kill()
            child.wait()
        assert child.returncode == -9

        raw = Path(files.path("acct-crash", DOC)).read_bytes()
        doc = json.loads(raw)  # parses: never torn
        assert doc == document(doc["seq"])  # a complete document of the sequence
        assert doc["seq"] > last_seq  # the old one or a newer one (each child writes once)
        assert files.read("acct-crash", DOC) == doc
        last_seq = doc["seq"]

        temps = [e for e in os.listdir(folder) if e.startswith(".doc.json.tmp-")]
        assert all(TEMP_NAME.match(e) for e in temps)
        assert set(os.listdir(folder)) == {DOC, DOC + ".lock", *temps}
        # The next writer removes what the previous one left: never more than the last one's.
        assert len(temps) <= 1
        kills_mid_write += len(temps)

    # Most kills land between mkstemp and replace; at least one must have, or nothing was tested.
    assert kills_mid_write >= 1
    files.update("acct-crash", DOC, lambda doc: document(doc["seq"] + 1))
    assert sorted(os.listdir(folder)) == [DOC, DOC + ".lock"]
    assert files.accounts() == ["acct-crash"]


# -- locking across processes -----------------------------------------------------------------


def test_concurrent_updates_from_processes_lose_no_increment(files, data_dir):
    processes, increments = 4, 50
    children = [
        _child(COUNTER_CHILD, str(data_dir), str(increments), stdin=True) for _ in range(processes)
    ]
    try:
        for child in children:
            assert child.stdout.readline() == b"ready\n"
        for child in children:  # all start together, so the updates overlap
            child.stdin.write(b"go\n")
            child.stdin.flush()
        for child in children:
            out, _ = child.communicate(timeout=60)
            assert (child.returncode, out) == (0, b"done\n")
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
            child.communicate()

    assert files.read("acct-shared", "counter.json") == {"counter": processes * increments}


def test_a_held_lock_blocks_only_its_own_document(files, data_dir, monkeypatch):
    monkeypatch.setattr(files_module, "LOCK_TIMEOUT_SECONDS", 0.3)
    files.write("acct-a", DOC, {"written-by": "parent"})
    with _child(HOLDER_CHILD, str(data_dir), stdin=True) as holder:
        try:
            assert holder.stdout.readline() == b"holding\n"  # inside update(), lock held

            files.write("acct-b", DOC, {"b": 1})  # another account: not blocked
            files.write("acct-a", "other.json", {"o": 1})  # another document: not blocked
            assert files.read("acct-a", DOC) == {"written-by": "parent"}  # reads never block
            with pytest.raises(filelock.Timeout):
                files.update("acct-a", DOC, lambda _doc: {"written-by": "intruder"})

            holder.stdin.write(b"release\n")
            holder.stdin.flush()
            assert holder.stdout.readline() == b"done\n"
            holder.wait(timeout=10)
        finally:
            if holder.poll() is None:
                holder.kill()
    assert holder.returncode == 0
    assert files.read("acct-a", DOC) == {"written-by": "holder"}
    assert files.read("acct-b", DOC) == {"b": 1}
    files.write("acct-a", DOC, {"written-by": "parent"})  # released: free again
    assert files.read("acct-a", DOC) == {"written-by": "parent"}


def test_delete_for_an_account_without_files_creates_nothing(tmp_path) -> None:
    files = AccountFiles(str(tmp_path))
    assert files.delete("acct-never", "smtp-settings.json") is False
    assert not (tmp_path / "shared-data" / "acct-never").exists()
    assert files.accounts() == []
