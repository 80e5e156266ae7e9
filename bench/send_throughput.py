"""Send throughput of smtp-service under real gunicorn, pooled vs unpooled.

Starts a local SMTP server that requires STARTTLS and AUTH (bench/smtp_sink.py, own process),
then for each mode starts gunicorn (`gunicorn.conf.py`, `wsgi:app`) with SMTP_POOL_SIZE=3 or 0,
saves the account's SMTP settings through the API, and sends N messages through
POST /api/messages/send-email at several concurrency levels with a small asyncio HTTP/1.1
keep-alive client. Prints messages/s and p50/p99 latency, and checks that the SMTP server got
exactly the number of messages answered 200.

    .venv/bin/python bench/send_throughput.py [--requests 3000] [--concurrency 1,8,32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import jwt as pyjwt  # noqa: E402
import trustme  # noqa: E402

from smtp_service.services.crypto import new_key  # noqa: E402

SECRET = "bench-secret-" + "x" * 40
logging.getLogger("mail.log").setLevel(logging.ERROR)
USER, PASSWORD = "bench@example.com", "bench-password-123"


def free_port() -> int:
    """A free loopback port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def token(account: str) -> str:
    """A valid HS256 token for the account."""
    now = int(time.time())
    return pyjwt.encode(
        {"sub": "bench", "accountId": account, "iat": now, "exp": now + 3600, "type": "access"},
        SECRET,
        algorithm="HS256",
    )


def wait_http(url: str, seconds: float = 20) -> None:
    """Poll until the URL answers."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{url} did not answer")


def api(base: str, method: str, path: str, auth: str, body: dict | None = None) -> dict:
    """One JSON request."""
    req = urllib.request.Request(
        base + path,
        method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": f"Bearer {auth}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def start_sink(kind: str, workdir: str) -> tuple[subprocess.Popen, int, str]:
    """Start the benchmark SMTP server ("aiosmtpd" or "node") with a certificate from a new CA
    in workdir; return the process (ready), its port and the CA file to trust. Terminating it
    makes it print how many messages it received."""
    ca = trustme.CA()
    cert = ca.issue_cert("localhost", "127.0.0.1")
    ca_file, cert_file, key_file = (
        os.path.join(workdir, name) for name in ("ca.pem", "cert.pem", "key.pem")
    )
    ca.cert_pem.write_to_path(ca_file)
    cert.cert_chain_pems[0].write_to_path(cert_file)
    cert.private_key_pem.write_to_path(key_file)
    port = free_port()
    command = {
        "aiosmtpd": [sys.executable, os.path.join(ROOT, "bench", "smtp_sink.py")],
        "node": ["node", os.path.join(ROOT, "bench", "smtp_sink.mjs")],
    }[kind]
    sink = subprocess.Popen(
        [
            *command,
            "--port",
            str(port),
            "--cert",
            cert_file,
            "--key",
            key_file,
            "--user",
            USER,
            "--password",
            PASSWORD,
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert sink.stdout is not None and sink.stdout.readline().strip() == "ready"
    return sink, port, ca_file


async def _worker(
    host: str,
    port: int,
    request: bytes,
    count: int,
    latencies: list[float],
    statuses: dict[int, int],
    per_connection: int | None = None,
) -> None:
    """Send `count` requests one after another on a keep-alive connection, opening a new one
    after every `per_connection` requests when set (the connect is not in the latency)."""
    while count > 0:
        batch = min(count, per_connection or count)
        await _connection(host, port, request, batch, latencies, statuses)
        count -= batch


async def _connection(
    host: str,
    port: int,
    request: bytes,
    count: int,
    latencies: list[float],
    statuses: dict[int, int],
) -> None:
    """Send `count` requests on one new keep-alive connection, recording latency and status."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        for _ in range(count):
            started = time.perf_counter()
            writer.write(request)
            status_line = await reader.readline()
            length = 0
            while True:
                line = await reader.readline()
                if line in (b"\r\n", b""):
                    break
                name, _, value = line.decode().partition(":")
                if name.lower() == "content-length":
                    length = int(value)
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - started)
            status = int(status_line.split()[1])
            statuses[status] = statuses.get(status, 0) + 1
    finally:
        writer.close()
        await writer.wait_closed()


def send_request(host: str, port: int, auth: str) -> bytes:
    """One send-email request, as bytes on the wire."""
    body = json.dumps(
        {
            "from": USER,
            "to": "rcpt@example.net",
            "subject": "bench",
            "text": "hello from the benchmark",
        }
    ).encode()
    return (
        f"POST /api/messages/send-email HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Authorization: Bearer {auth}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def health_request(host: str, port: int) -> bytes:
    """GET /healthz: the same server doing almost nothing (the HTTP stack's own ceiling)."""
    return f"GET /healthz HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()


async def load(
    host: str,
    port: int,
    request: bytes,
    total: int,
    concurrency: int,
    per_connection: int | None = None,
) -> dict:
    """Send `total` requests over `concurrency` keep-alive connections at a time, each replaced
    by a new one after `per_connection` requests when set.

    gunicorn's workers share one listening socket, and which worker accepts a connection is
    chance: over a few long-lived connections one worker can get most of them and the other
    idle. New connections along the way spread the load as a real client population does."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    per = [total // concurrency + (1 if i < total % concurrency else 0) for i in range(concurrency)]
    started = time.perf_counter()
    await asyncio.gather(
        *(_worker(host, port, request, n, latencies, statuses, per_connection) for n in per)
    )
    elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "rate": total / elapsed,
        "p50": statistics.median(latencies) * 1000,
        "p99": latencies[max(0, int(len(latencies) * 0.99) - 1)] * 1000,
        "statuses": statuses,
    }


def run_mode(
    pool_size: int, args: argparse.Namespace, smtp_port: int, ca_file: str, workdir: str
) -> list[tuple[int, dict]]:
    """Start gunicorn with one pool size, measure every concurrency level, stop it."""
    port = free_port()
    env = {
        **os.environ,
        "BIND": f"127.0.0.1:{port}",
        "JWT_SECRET_KEY": SECRET,
        "JWT_PUBLIC_KEY": "",
        "JWT_ALGORITHM": "",
        "DATA_DIR": os.path.join(workdir, f"data-{pool_size}"),
        "SMTP_ENCRYPTION_KEYS": new_key(),
        "SMTP_HOST_ALLOWLIST": "127.0.0.1/32,localhost",
        "SMTP_HOST": "localhost",
        "SMTP_PORT": str(smtp_port),
        "SMTP_USER": USER,
        "SMTP_PASS": PASSWORD,
        "SMTP_FROM": USER,
        "SMTP_POOL_SIZE": str(pool_size),
        "SSL_CERT_FILE": ca_file,
        "WEB_CONCURRENCY": str(args.workers),
        "GUNICORN_THREADS": str(args.threads),
        "LOG_LEVEL": "WARNING",
    }
    log = open(os.path.join(workdir, f"gunicorn-{pool_size}.log"), "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            os.path.join(ROOT, ".venv/bin/gunicorn"),
            "-c",
            "gunicorn.conf.py",
            "--access-logfile",
            "/dev/null",
            "wsgi:app",
        ],
        cwd=ROOT,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    results = []
    try:
        base = f"http://127.0.0.1:{port}"
        wait_http(base + "/healthz")
        auth = token("bench-account")
        api(
            base,
            "POST",
            "/api/smtp/settings",
            auth,
            {"host": "localhost", "port": smtp_port, "user": USER, "pass": PASSWORD},
        )
        request = send_request("127.0.0.1", port, auth)
        warm = asyncio.run(load("127.0.0.1", port, request, 200, 8))  # warm-up: imports, pools
        results.append((0, warm))
        for concurrency in args.concurrency:
            results.append(
                (
                    concurrency,
                    asyncio.run(load("127.0.0.1", port, request, args.requests, concurrency)),
                )
            )
        if pool_size:  # the ceiling: the same server answering GET /healthz
            health = health_request("127.0.0.1", port)
            top = max(args.concurrency)
            results.append((-top, asyncio.run(load("127.0.0.1", port, health, args.requests, top))))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
    return results


def main() -> None:
    """Run both modes and print the table."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument(
        "--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32]
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument(
        "--sink",
        choices=["aiosmtpd", "node"],
        default="aiosmtpd",
        help="SMTP server: aiosmtpd (Python) or Nodemailer's smtp-server (Node.js); "
        "both require STARTTLS and AUTH",
    )
    parser.add_argument(
        "--pool-size", type=int, default=3, help="SMTP_POOL_SIZE of the pooled run (default 3)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        sink, smtp_port, ca_file = start_sink(args.sink, workdir)
        try:
            table = {}
            for pool_size in (args.pool_size, 0):
                table[pool_size] = run_mode(pool_size, args, smtp_port, ca_file, workdir)
        finally:
            sink.terminate()
            out, _ = sink.communicate(timeout=30)
        received = int(out.strip().splitlines()[-1])
    print(
        f"send-email through gunicorn ({args.workers} workers x {args.threads} threads), "
        f"{args.sink} SMTP server with STARTTLS + AUTH, pool size {args.pool_size}, "
        f"{args.requests} requests per level, "
        f"{os.cpu_count()} CPUs"
    )
    print(f"{'mode':<10}{'conc':>6}{'msg/s':>10}{'p50 ms':>10}{'p99 ms':>10}  statuses")
    ok = 0
    ceiling: list[str] = []
    for pool_size, rows in table.items():
        mode = "pooled" if pool_size else "unpooled"
        for concurrency, r in rows:
            if concurrency >= 0:  # send-email rows (0: the warm-up); each 200 is one message
                ok += r["statuses"].get(200, 0)
            if concurrency == 0:
                continue
            if concurrency < 0:
                ceiling.append(
                    f"{'healthz':<10}{-concurrency:>6}{r['rate']:>10.0f}{r['p50']:>10.1f}"
                    f"{r['p99']:>10.1f}  {r['statuses']}  (GET /healthz: the HTTP stack alone)"
                )
                continue
            print(
                f"{mode:<10}{concurrency:>6}{r['rate']:>10.0f}{r['p50']:>10.1f}"
                f"{r['p99']:>10.1f}  {r['statuses']}"
            )
    print("\n".join(ceiling))
    for concurrency in args.concurrency:
        pooled = dict(table[args.pool_size])[concurrency]["rate"]
        unpooled = dict(table[0])[concurrency]["rate"]
        print(f"pooled/unpooled at concurrency {concurrency}: {pooled / unpooled:.1f}x")
    print(f"SMTP server received {received} messages; 200 answers (with warm-up): {ok}")
    if received != ok:
        sys.exit("mismatch between 200 answers and delivered messages")


if __name__ == "__main__":
    main()
