"""Load with faults: many clients of several accounts send through a real multi-worker gunicorn
while their settings are saved, changed and deleted, and while the SMTP servers misbehave the
way real ones do (issue #10): they drop one connection in N (after MAIL, or after the content
before the final reply), refuse one RCPT in N for policy ("554 5.7.1 ... blocked using" an RBL),
answer one final dot in N slowly (later than the command timeout, within the final-reply
timeout, as content filters do), and one of the account servers is a relay that offers no AUTH.
Then it checks what users rely on:

- every message answered 200 was delivered exactly once, to a server its account pointed at
  while the request was in flight (its own server, or the global one while it had none);
- no message answered 502 was delivered (every fault hits before the server accepts it);
- no address was suppressed (no refusal in the run is about a mailbox), so no send was 422;
- every settings file parses; every worker that started is still alive;
- memory (peak RSS) and open descriptors per worker stay bounded (sampled through the run).

    .venv/bin/python bench/soak.py [--seconds 180] [--accounts 4] [--clients 4] [--drop-every 50]
        [--policy-every 40] [--slow-every 60] [--slow-seconds 3]

`make test` runs a 20-second version (tests/e2e/test_soak.py) with the same code.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import logging
import os
import random
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import jwt as pyjwt  # noqa: E402
import trustme  # noqa: E402
from aiosmtpd.controller import Controller  # noqa: E402
from aiosmtpd.smtp import AuthResult, LoginPassword  # noqa: E402

from smtp_service.services.crypto import new_key  # noqa: E402

SECRET = "soak-secret-" + "s" * 40
USER, PASSWORD = "soak@example.com", "soak-password-456"
GLOBAL_USER, GLOBAL_PASSWORD = "global@example.com", "global-password-789"
GLOBAL_FROM = USER  # the same address is allowed through the global server
# Seconds a client waits for an answer: past SMTP_DEADLINE, which bounds every send.
CLIENT_TIMEOUT = 200


def free_port() -> int:
    """A free loopback port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class FlakyHandler:
    """Accepts messages and records their subjects; drops one session in `drop_every`,
    alternately after MAIL (before any content) and after the DATA content (before the reply);
    refuses one RCPT in `policy_every` for policy; answers one final dot in `slow_every` after
    `slow_seconds`. Without `offer_auth` its EHLO lists no AUTH (a relay that trusts the
    client's address)."""

    def __init__(
        self,
        name: str,
        drop_every: int,
        policy_every: int = 0,
        slow_every: int = 0,
        slow_seconds: float = 0.0,
        offer_auth: bool = True,
    ) -> None:
        self.name = name
        self.drop_every = drop_every
        self.policy_every = policy_every
        self.slow_every = slow_every
        self.slow_seconds = slow_seconds
        self.offer_auth = offer_auth
        self.lock = threading.Lock()
        self.subjects: Counter[str] = Counter()
        self.commands = 0
        self.rcpts = 0
        self.datas = 0
        self.drops = {"after MAIL": 0, "after DATA": 0}
        self.policy_refusals = 0
        self.slow_replies = 0
        self.unauthenticated = 0  # messages taken without AUTH

    async def handle_EHLO(self, server, session, envelope, hostname, responses):  # noqa: ANN001, ANN201, N802
        session.host_name = hostname
        if self.offer_auth:
            return responses
        return [line for line in responses if not line[4:].upper().startswith("AUTH")]

    async def handle_RCPT(self, server, session, envelope, address, options):  # noqa: ANN001, ANN201, N802
        with self.lock:
            self.rcpts += 1
            refuse = bool(self.policy_every) and self.rcpts % self.policy_every == 0
            if refuse:
                self.policy_refusals += 1
        if refuse:
            return ("554 5.7.1 Service unavailable; Client host [127.0.0.1] blocked using "
                    "zen.spamhaus.example")
        envelope.rcpt_tos.append(address)
        return "250 OK"

    def _should_drop(self, here: str) -> bool:
        """Every drop_every-th MAIL or DATA, by turns: True when this one (`here`) drops."""
        with self.lock:
            self.commands += 1
            if self.drop_every and self.commands % self.drop_every == 0:
                kind = "after MAIL" if (self.commands // self.drop_every) % 2 else "after DATA"
                if kind == here:  # counted only when it happens
                    self.drops[kind] += 1
                    return True
        return False

    async def handle_MAIL(self, server, session, envelope, address, options):  # noqa: ANN001, N802
        if self._should_drop("after MAIL"):
            server.transport.close()
            return "421 4.4.2 dropped on purpose"
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope):  # noqa: ANN001, N802
        if self._should_drop("after DATA"):
            server.transport.close()  # content received, never acknowledged
            return "451 4.3.0 dropped on purpose"
        subject = ""
        for line in envelope.content.split(b"\r\n"):
            if line.lower().startswith(b"subject:"):
                subject = line[8:].strip().decode()
                break
        with self.lock:
            self.datas += 1
            slow = bool(self.slow_every) and self.datas % self.slow_every == 0
            if slow:
                self.slow_replies += 1
        if slow:  # a content filter at work: later than the command timeout
            await asyncio.sleep(self.slow_seconds)
        with self.lock:
            self.subjects[subject] += 1
            if getattr(session, "auth_data", None) is None:
                self.unauthenticated += 1
        return "250 OK"


def start_smtp(
    name: str,
    user: str,
    password: str,
    context: ssl.SSLContext,
    drop_every: int,
    policy_every: int = 0,
    slow_every: int = 0,
    slow_seconds: float = 0.0,
    offer_auth: bool = True,
):
    """A STARTTLS + AUTH aiosmtpd server in a thread (without offer_auth: STARTTLS, no AUTH)."""

    def authenticate(server, session, envelope, mechanism, data):  # noqa: ANN001, ANN202
        ok = (
            isinstance(data, LoginPassword)
            and data.login.decode() == user
            and data.password.decode() == password
        )
        return AuthResult(success=ok)

    handler = FlakyHandler(name, drop_every, policy_every, slow_every, slow_seconds, offer_auth)
    auth = {"authenticator": authenticate, "auth_required": True} if offer_auth else {}
    controller = Controller(
        handler,
        hostname="127.0.0.1",
        port=free_port(),
        server_hostname="localhost",
        tls_context=context,
        require_starttls=True,
        **auth,
    )
    controller.start()
    return controller, handler


@dataclass
class Outcome:
    """What the clients saw."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    ok: list[tuple[str, str, float, float]] = field(default_factory=list)  # subj, acct, t0, t1
    failed: list[tuple[str, int, str]] = field(default_factory=list)  # subj, status, error
    statuses: Counter[int] = field(default_factory=Counter)
    categories: Counter[str] = field(default_factory=Counter)  # of the 502s
    slowest_200: float = 0.0


@dataclass
class Timeline:
    """Per account: (start, end, server name) of each settings change request. While a change
    is in flight the account may point at either the old or the new server."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    changes: dict[str, list[tuple[float, float, str]]] = field(default_factory=dict)

    def add(self, account: str, began: float, ended: float, server: str) -> None:
        with self.lock:
            self.changes.setdefault(account, []).append((began, ended, server))

    def servers_between(self, account: str, t0: float, t1: float) -> set[str]:
        """Servers the account may have pointed at at some moment in [t0, t1]."""
        changes = self.changes[account]
        names = {name for began, ended, name in changes if began <= t1 and ended >= t0}
        settled = [name for _, ended, name in changes if ended < t0]
        if settled:
            names.add(settled[-1])
        return names


def token(account: str) -> str:
    now = int(time.time())
    claims = {"sub": "soak", "accountId": account, "iat": now, "exp": now + 7200}
    return pyjwt.encode(claims, SECRET, algorithm="HS256")


class Client:
    """One keep-alive HTTP connection. A request whose connection fails is sent once more on a
    new one (gunicorn may close a kept-alive connection as the request goes out); `retried`
    lists (body, exception, seconds) of those, since a retry of a request the service did get
    would send its message twice."""

    retried: list[tuple[Any, str, float]] = []  # shared by every client of a run

    def close(self) -> None:
        self.conn.close()

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=CLIENT_TIMEOUT)

    def call(self, method: str, path: str, auth: str, body: Any = None) -> tuple[int, Any]:
        payload = json.dumps(body).encode() if body is not None else None
        headers = {"Authorization": f"Bearer {auth}"}
        if payload is not None:
            headers["Content-Type"] = "application/json"
        for attempt in (1, 2):
            began = time.monotonic()
            try:
                self.conn.request(method, path, body=payload, headers=headers)
                resp = self.conn.getresponse()
                return resp.status, json.loads(resp.read() or b"null")
            except (http.client.HTTPException, OSError) as exc:
                self.conn.close()
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port,
                                                       timeout=CLIENT_TIMEOUT)
                Client.retried.append((body, type(exc).__name__, time.monotonic() - began))
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")


def worker_pids(master: int) -> list[int]:
    """gunicorn's worker processes (children of the master)."""
    out = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(master)], capture_output=True, text=True, check=False
    ).stdout
    return sorted(int(p) for p in out.split())


def sample(pid: int) -> tuple[int, int]:
    """(peak RSS in KiB, open descriptors) of one process."""
    with open(f"/proc/{pid}/status") as handle:
        hwm = next(int(line.split()[1]) for line in handle if line.startswith("VmHWM:"))
    return hwm, len(os.listdir(f"/proc/{pid}/fd"))


def run(
    seconds: float = 180,
    accounts: int = 4,
    clients: int = 4,
    drop_every: int = 50,
    workers: int = 2,
    change_every: float = 0.5,
    log=print,  # noqa: ANN001
    policy_every: int = 40,
    slow_every: int = 60,
    slow_seconds: float = 3.0,
) -> dict[str, Any]:
    """Run the soak and return its figures and any violations."""
    logging.getLogger("mail.log").setLevel(logging.ERROR)  # aiosmtpd's deprecation chatter
    Client.retried.clear()
    work = tempfile.mkdtemp(prefix="soak-")
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    ca_file = os.path.join(work, "ca.pem")
    ca.cert_pem.write_to_path(ca_file)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)

    faults = {"policy_every": policy_every, "slow_every": slow_every,
              "slow_seconds": slow_seconds}
    servers = {
        "A": start_smtp("A", USER, PASSWORD, context, drop_every, **faults),
        "B": start_smtp("B", USER, PASSWORD, context, drop_every, **faults),
        "relay": start_smtp("relay", USER, PASSWORD, context, drop_every, **faults,
                            offer_auth=False),
        "global": start_smtp("global", GLOBAL_USER, GLOBAL_PASSWORD, context, drop_every,
                             **faults),
    }
    port = free_port()
    data_dir = os.path.join(work, "data")
    env = {
        **os.environ,
        "BIND": f"127.0.0.1:{port}",
        "WEB_CONCURRENCY": str(workers),
        "GUNICORN_THREADS": "8",
        "DATA_DIR": data_dir,
        "JWT_SECRET_KEY": SECRET,
        "JWT_PUBLIC_KEY": "",
        "JWT_ALGORITHM": "HS256",
        "SMTP_ENCRYPTION_KEYS": new_key(),
        "SMTP_HOST_ALLOWLIST": "127.0.0.1/32,localhost",
        "SMTP_HOST": "localhost",
        "SMTP_PORT": str(servers["global"][0].port),
        "SMTP_USER": GLOBAL_USER,
        "SMTP_PASS": GLOBAL_PASSWORD,
        "SMTP_FROM": GLOBAL_FROM,
        # the senders are added by hand (no confirmation message would land as a stray one)
        "GLOBAL_SENDER_VERIFICATION": "manual",
        # Commands answered within 2 s; the final dot's reply may take the default 120 s, so a
        # slow one (slow_seconds) is still a 200.
        "SMTP_TIMEOUT": "",
        "SMTP_CONNECT_TIMEOUT": "5",
        "SMTP_COMMAND_TIMEOUT": str(max(2.0, slow_seconds / 1.5)),
        "SSL_CERT_FILE": ca_file,
        "LOG_LEVEL": "WARNING",
    }
    env.pop("GUNICORN_CMD_ARGS", None)
    gunicorn_log = open(os.path.join(work, "gunicorn.log"), "wb")  # noqa: SIM115
    gunicorn = os.path.join(ROOT, ".venv", "bin", "gunicorn")
    proc = subprocess.Popen(
        [gunicorn, "-c", "gunicorn.conf.py", "--no-control-socket", "--access-logfile",
         "/dev/null", "wsgi:app"],
        cwd=ROOT,
        env=env,
        stdout=gunicorn_log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    outcome, timeline = Outcome(), Timeline()
    names = [f"soak-{i}" for i in range(accounts)]
    tokens = {a: token(a) for a in names}
    stop = threading.Event()
    violations: list[str] = []
    peaks: dict[int, tuple[int, int]] = {}
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("gunicorn did not start") from None
                time.sleep(0.1)
        admin = Client(port)
        for a in names:
            status, body = admin.call("POST", "/api/senders", tokens[a], {"email": USER})
            assert status == 201, body
            settings = {"host": "localhost", "port": servers["A"][0].port,
                        "user": USER, "pass": PASSWORD}
            began = time.monotonic()
            assert admin.call("POST", "/api/smtp/settings", tokens[a], settings)[0] == 200
            timeline.add(a, began, time.monotonic(), "A")
        time.sleep(0.5)
        start_pids = worker_pids(proc.pid)
        baseline = {pid: sample(pid) for pid in start_pids}

        admin.close()

        def changer(account: str) -> None:
            client, rng = Client(port), random.Random(account)
            try:
                change_settings(client, rng, account)
            finally:
                client.close()

        def change_settings(client: Client, rng: random.Random, account: str) -> None:
            while not stop.wait(change_every * (0.5 + rng.random())):
                target = rng.choice(["A", "B", "relay", "global"])
                t0 = time.monotonic()
                if target == "global":
                    status, _ = client.call("DELETE", "/api/smtp/settings", tokens[account])
                else:
                    body = {"host": "localhost", "port": servers[target][0].port,
                            "user": USER, "pass": PASSWORD}
                    status, _ = client.call("POST", "/api/smtp/settings", tokens[account], body)
                timeline.add(account, t0, time.monotonic(), target)
                if status != 200:
                    violations.append(f"settings change for {account} answered {status}")

        def sender(account: str, n: int) -> None:
            client = Client(port)
            try:
                send_messages(client, account, n)
            finally:
                client.close()

        def send_messages(client: Client, account: str, n: int) -> None:
            i = 0
            while not stop.is_set():
                i += 1
                subject = f"{account}/{n}/{i}"
                body = {"from": USER, "to": "rcpt@example.net", "subject": subject, "text": "x"}
                t0 = time.monotonic()
                status, answer = client.call("POST", "/api/messages/send-email", tokens[account],
                                             body)
                t1 = time.monotonic()
                with outcome.lock:
                    outcome.statuses[status] += 1
                    if status == 200:
                        outcome.ok.append((subject, account, t0, t1))
                        outcome.slowest_200 = max(outcome.slowest_200, t1 - t0)
                    else:
                        outcome.failed.append((subject, status, str(answer.get("error"))))
                        outcome.categories[str(answer.get("category"))] += 1

        def sampler() -> None:
            while not stop.wait(1.0):
                for pid in start_pids:
                    try:
                        rss, fds = sample(pid)
                    except (OSError, StopIteration):
                        continue
                    old = peaks.get(pid, (0, 0))
                    peaks[pid] = (max(old[0], rss), max(old[1], fds))

        threads = [threading.Thread(target=changer, args=(a,)) for a in names]
        threads += [threading.Thread(target=sender, args=(a, n)) for a in names
                    for n in range(clients)]
        threads.append(threading.Thread(target=sampler))
        began = time.monotonic()
        for t in threads:
            t.start()
        stop.wait(seconds)
        stop.set()
        for t in threads:
            t.join(timeout=60)
        elapsed = time.monotonic() - began
        time.sleep(0.2)

        # No refusal in the run is about a mailbox: nothing may be on a suppression list.
        checker = Client(port)
        suppressed = 0
        for a in names:
            status, listed = checker.call("GET", "/api/suppressions", tokens[a])
            suppressed += len(listed.get("suppressions", [])) if status == 200 else 0
        checker.close()

        end_pids = worker_pids(proc.pid)
        if end_pids != start_pids:
            violations.append(f"workers changed: {start_pids} -> {end_pids}")
        for pid in end_pids:
            peaks.setdefault(pid, sample(pid))
    finally:
        stop.set()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        gunicorn_log.close()
        for controller, _ in servers.values():
            controller.stop()

    # -- the checks -------------------------------------------------------------------------
    landed: dict[str, list[str]] = {}
    for name, (_, handler) in servers.items():
        for subject, count in handler.subjects.items():
            landed.setdefault(subject, []).extend([name] * count)
    # Only the soak's own messages count: the service sends some of its own (a confirmation
    # code for each new sender, all with one subject).
    sent = {subject for subject, *_ in outcome.ok} | {subject for subject, *_ in outcome.failed}
    landed = {subject: where for subject, where in landed.items() if subject in sent}
    duplicates = sum(1 for where in landed.values() if len(where) > 1)
    retried = {b["subject"] for b, _, _ in Client.retried if isinstance(b, dict) and "subject" in b}
    duplicated_after_retry = sum(
        1 for subject, where in landed.items() if len(where) > 1 and subject in retried
    )
    lost = wrong_server = 0
    for subject, account, t0, t1 in outcome.ok:
        where = landed.get(subject, [])
        if not where:
            lost += 1
        elif where[0] not in timeline.servers_between(account, t0, t1):
            wrong_server += 1
    failed_but_delivered = sum(1 for subject, _, _ in outcome.failed if subject in landed)
    relay = servers["relay"][1]
    relay_authenticated = sum(relay.subjects.values()) - relay.unauthenticated
    unparseable = []
    shared = os.path.join(data_dir, "shared-data")
    for account in os.listdir(shared):
        for name in os.listdir(os.path.join(shared, account)):
            if name.endswith(".json"):
                try:
                    with open(os.path.join(shared, account, name)) as handle:
                        json.load(handle)
                except ValueError:
                    unparseable.append(f"{account}/{name}")
    with open(os.path.join(work, "gunicorn.log"), errors="replace") as handle:
        tracebacks = handle.read().count("Traceback")
    for label, count in (
        ("duplicates", duplicates),
        ("lost (200 but not delivered)", lost),
        ("delivered to a server the account did not point at", wrong_server),
        ("answered non-200 but delivered", failed_but_delivered),
        ("unparseable settings files", len(unparseable)),
        ("wrongly suppressed addresses", suppressed),
        ("sends refused as suppressed (422)", outcome.statuses.get(422, 0)),
        ("taken with AUTH by the relay that offers none", relay_authenticated),
        ("tracebacks in gunicorn's log", tracebacks),
    ):
        if count:
            violations.append(f"{label}: {count}")
    if any(status >= 500 and status != 502 for status in outcome.statuses):
        violations.append(f"unexpected statuses: {dict(outcome.statuses)}")
    drops = {name: dict(h.drops) for name, (_, h) in servers.items()}
    changes = sum(len(v) for v in timeline.changes.values()) - accounts
    growth = {
        pid: (peaks[pid][0] - baseline[pid][0], peaks[pid][1] - baseline[pid][1])
        for pid in baseline if pid in peaks
    }
    report = {
        "seconds": round(elapsed, 1),
        "accounts": accounts,
        "clients": accounts * clients,
        "workers": workers,
        "requests": sum(outcome.statuses.values()),
        "sent_200": len(outcome.ok),
        "rate_per_s": round(sum(outcome.statuses.values()) / elapsed, 1),
        "statuses": dict(outcome.statuses),
        "settings_changes": changes,
        "connections_dropped": drops,
        "policy_refusals": {n: h.policy_refusals for n, (_, h) in servers.items()},
        "slow_final_replies": {n: h.slow_replies for n, (_, h) in servers.items()},
        "delivered_without_auth": relay.unauthenticated,
        "failed_by_category": dict(outcome.categories),
        "slowest_200_s": round(outcome.slowest_200, 2),
        "client_retries": [(e, round(t, 2)) for _, e, t in Client.retried],
        "duplicates": duplicates,
        "duplicates_after_a_client_retry": duplicated_after_retry,
        "lost": lost,
        "wrong_server": wrong_server,
        "failed_but_delivered": failed_but_delivered,
        "wrongly_suppressed": suppressed,
        "worker_peak_rss_kib_and_fds": {str(p): v for p, v in peaks.items()},
        "worker_growth_rss_kib_and_fds": {str(p): v for p, v in growth.items()},
        "violations": violations,
    }
    log(json.dumps(report, indent=2))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=180)
    parser.add_argument("--accounts", type=int, default=4)
    parser.add_argument("--clients", type=int, default=4, help="per account")
    parser.add_argument("--drop-every", type=int, default=50)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--policy-every", type=int, default=40, help="0: no policy refusals")
    parser.add_argument("--slow-every", type=int, default=60, help="0: no slow final replies")
    parser.add_argument("--slow-seconds", type=float, default=3.0)
    args = parser.parse_args()
    report = run(args.seconds, args.accounts, args.clients, args.drop_every, args.workers,
                 policy_every=args.policy_every, slow_every=args.slow_every,
                 slow_seconds=args.slow_seconds)
    if report["violations"]:
        sys.exit("FAILED: " + "; ".join(report["violations"]))


if __name__ == "__main__":
    main()
