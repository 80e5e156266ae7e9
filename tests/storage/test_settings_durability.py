"""Saving settings through the service (encrypt, validate, atomic locked write) survives SIGKILL
at any moment and concurrent savers in several processes: the file is always one whole save."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time

from smtp_service.services.crypto import new_key
from smtp_service.services.settings import SETTINGS_FILE
from smtp_service.storage.files import AccountFiles

ACCOUNT = "acct-durable"

# A child process: the real app's SettingsService, saving the writer's own settings in a loop
# (the nth save of writer w has host w-n.example.com, user w@example.com, pass secret-w-n-...).
_SAVER = """
import sys
from smtp_service import create_app

data_dir, key, writer, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
app = create_app({"DATA_DIR": data_dir, "JWT_SECRET_KEY": "x" * 40, "SMTP_ENCRYPTION_KEYS": key,
                  "SMTP_HOST": "", "LOG_LEVEL": "WARNING"})
settings = app.extensions["smtp_service"].settings
print("ready", flush=True)
n = 0
while count == 0 or n < count:
    n += 1
    settings.save("acct-durable", "user-" + writer, {
        "host": f"{writer}-{n}.example.com", "port": 587, "secure": False,
        "user": f"{writer}@example.com", "password": f"secret-{writer}-{n}-" + "p" * 200,
        "requireTls": True})
    if n == 1:
        print("saved", flush=True)  # once: a parent that does not read must not block it
"""


def _start(data_dir: str, key: str, writer: str, count: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _SAVER, data_dir, key, writer, str(count)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def _loader(data_dir: str, key: str):
    """A function that reads the stored settings through an app of its own: parsed, validated
    and decrypted (each call sees the file as it is then)."""
    from smtp_service import create_app

    app = create_app({"DATA_DIR": data_dir, "JWT_SECRET_KEY": "x" * 40,
                      "SMTP_ENCRYPTION_KEYS": key, "SMTP_HOST": ""})
    return lambda: app.extensions["smtp_service"].settings.load(ACCOUNT)


def _load(data_dir: str, key: str):
    """The stored settings through a fresh app: parsed, validated and decrypted."""
    return _loader(data_dir, key)()


def _whole(stored) -> tuple[str, int]:
    """(writer, n) of a stored save, after checking its fields all come from that one save."""
    e = stored.endpoint
    writer, n = e.host.removesuffix(".example.com").rsplit("-", 1)
    assert e.user == f"{writer}@example.com"
    assert e.password.reveal() == f"secret-{writer}-{n}-" + "p" * 200
    assert stored.updated_by == f"user-{writer}"
    return writer, int(n)


def test_sigkill_while_saving_settings_leaves_the_old_or_the_new_save(tmp_path):
    """Each child is killed at a random moment after its first save, while it saves again and
    again: however long a loaded machine takes to start it, the kill lands mid-saving."""
    data_dir, key = str(tmp_path / "data"), new_key()
    rng = random.Random(7)
    path = AccountFiles(data_dir).path(ACCOUNT, SETTINGS_FILE)
    load = _loader(data_dir, key)
    for _kill in range(10):
        proc = _start(data_dir, key, "w", 0)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "saved"
        time.sleep(rng.uniform(0.0, 0.05))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        with open(path, encoding="utf-8") as handle:
            json.load(handle)  # parses: never torn
        writer, n = _whole(load())
        assert writer == "w" and n >= 1


def test_concurrent_savers_leave_one_whole_save(tmp_path):
    data_dir, key = str(tmp_path / "data"), new_key()
    writers = ["alpha", "bravo", "charlie", "delta"]
    procs = [_start(data_dir, key, w, 40) for w in writers]
    for proc in procs:
        assert proc.wait(timeout=60) == 0
        proc.stdout.close()
    writer, n = _whole(_load(data_dir, key))
    assert writer in writers and n == 40  # the final file is some writer's last save, whole
    folder = os.path.dirname(AccountFiles(data_dir).path(ACCOUNT, SETTINGS_FILE))
    assert not [f for f in os.listdir(folder) if ".tmp-" in f]  # no half-written leftovers
