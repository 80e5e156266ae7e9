"""`make run`'s first-email path: with no SMTP_HOST, gunicorn starts the development mail
catcher, points the global server at it, and a send lands in DATA_DIR/outbox as .eml."""

from __future__ import annotations

import socket
import subprocess
import time
from email import message_from_bytes, policy

from tests.e2e.conftest import (
    REPO_ROOT,
    LiveService,
    _gunicorn_command,
    _wait_healthy,
    free_port,
    service_environment,
)


def test_dev_mail_catcher_receives_the_first_email(tmp_path, trust_test_ca, global_server,
                                                    smtp_factory):
    port, dev_port = free_port(), free_port()
    data_dir = tmp_path / "data"
    env = service_environment(
        port=port, data_dir=data_dir, ca_file=trust_test_ca, global_server=global_server,
        SMTP_HOST="", SMTP_PORT="", SMTP_USER="", SMTP_PASS="", SMTP_FROM="",
        DEV_SMTP_PORT=str(dev_port),
    )
    log_path = tmp_path / "gunicorn.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            _gunicorn_command(), cwd=REPO_ROOT, env=env, stdin=subprocess.DEVNULL,
            stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
        )
    live = LiveService(
        base_url=f"http://127.0.0.1:{port}", port=port, data_dir=data_dir, log_path=log_path,
        jwt_secret=env["JWT_SECRET_KEY"], global_server=global_server,
        account_server=smtp_factory("starttls"), process=process,
        secrets=[env["JWT_SECRET_KEY"], env["SMTP_ENCRYPTION_KEYS"]],
    )
    try:
        _wait_healthy(live)
        token = live.token("acct-dev")
        view = live.request("GET", "/api/smtp/settings", token=token).json
        assert view["isGlobal"] is True and view["port"] == dev_port
        r = live.request("POST", "/api/messages/send-email", {
            "from": "dev@example.com", "to": "you@example.com", "subject": "First!",
            "text": "Hello"}, token=token)
        assert r.status == 200 and r.json["transport"] == "global", r.text
        outbox = data_dir / "outbox"
        deadline = time.monotonic() + 10
        while not list(outbox.glob("*.eml")) and time.monotonic() < deadline:
            time.sleep(0.1)
        (eml,) = outbox.glob("*.eml")
        message = message_from_bytes(eml.read_bytes(), policy=policy.default)
        assert message["Subject"] == "First!" and message["Message-ID"] == (
            f"<{r.json['messageId']}>")
        assert global_server.messages == []  # the configured-but-unused server got nothing
    finally:
        assert live.stop() == 0
    with socket.socket() as sock:  # the catcher stopped with gunicorn
        assert sock.connect_ex(("127.0.0.1", dev_port)) != 0
    live.assert_log_clean()
