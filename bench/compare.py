"""Send throughput of two commits side by side, in one run, against one SMTP sink.

The machine is shared and noisy, so a figure from one run cannot be compared with a figure from
another; this script measures a ratio instead. It checks out each revision in a detached
`git worktree` (in a temporary folder; 'worktree' means this working tree as it is, uncommitted
changes included), starts ONE SMTP sink and ONE gunicorn per checkout (`gunicorn.conf.py`,
`wsgi:app`, both from the same virtualenv, so dependencies do not differ), then runs R rounds,
each sending N POST /api/messages/send-email requests over C keep-alive connections to base, then
to head: only one gunicorn is under load at a time, and slow and fast spells of the machine fall
on both sides. Each connection is replaced after --per-connection requests (25): with a few
long-lived connections, which of gunicorn's workers accepted them is chance, one worker can end up
with most of the load, and that alone moved a round by 30 %; the "busiest worker" column shows
its share of the workers' CPU (50 % is an even split). It prints requests/s, p50/p99 latency and
the workers' CPU time per request (from /proc) of every round, the median per side and the
head/base ratios, and checks that every answer was 200 and that the sink received exactly one
message per 200 answer.

The sink is Postfix's smtp-sink (default; `make bench-deps` installs it): plain SMTP, no TLS,
no AUTH, PIPELINING, and cheap enough that the service's own cost shows. `--sink aiosmtpd` uses
bench/smtp_sink.py instead (STARTTLS and AUTH required, as in bench/send_throughput.py).
The token's account has no settings of its own, so every message goes through the global server;
with `--route custom` it saves settings pointing at the same sink first, so that every message
goes through the account's own server (the path of the circuit breaker's check, issue 12).

    .venv/bin/python bench/compare.py --base main [--head worktree] \\
        [--requests 2000] [--concurrency 16] [--rounds 3] [--route global|custom]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH)

import send_throughput as st  # noqa: E402  (the load generator, token and helpers)

ROOT = st.ROOT
VENV = os.path.realpath(os.path.join(ROOT, ".venv"))
SMTP_SINK = "/usr/sbin/smtp-sink"
SENDER = st.USER  # bench@example.com: SMTP_FROM of the global server and the messages' From
ACCOUNT = "bench-compare"  # an account with no SMTP settings of its own: the global route


def git(*args: str, cwd: str = ROOT) -> str:
    """Run git in the repository and return its stripped standard output."""
    return subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout.strip()


@dataclass
class Checkout:
    """One side of the comparison: a revision checked out somewhere."""

    side: str  # "base" or "head"
    rev: str  # as given on the command line
    sha: str  # the commit (short), with "+dirty" for a working tree with changes
    path: str
    temporary: bool  # a worktree this script added (and removes)


def checkout(side: str, rev: str, workdir: str) -> Checkout:
    """Add a detached worktree of rev under workdir, or take this working tree for 'worktree'."""
    if rev == "worktree":
        dirty = "+dirty" if git("status", "--porcelain", "--untracked-files=no") else ""
        return Checkout(side, rev, git("rev-parse", "--short", "HEAD") + dirty, ROOT, False)
    try:
        sha = git("rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}")
    except subprocess.CalledProcessError:
        sys.exit(f"compare: {rev!r} is not a commit of {ROOT}")
    path = os.path.join(workdir, side)
    git("worktree", "add", "--detach", "--quiet", path, sha)
    made = Checkout(side, rev, sha[:7], path, True)
    if not os.path.exists(os.path.join(path, "gunicorn.conf.py")):
        remove_checkout(made)
        sys.exit(f"compare: {rev} has no gunicorn.conf.py; it cannot be started the same way")
    return made


def remove_checkout(made: Checkout) -> None:
    """Remove a worktree this script added (never the working tree itself)."""
    if made.temporary:
        subprocess.run(
            ["git", "worktree", "remove", "--force", made.path],
            cwd=ROOT,
            check=False,
            capture_output=True,
        )
        shutil.rmtree(made.path, ignore_errors=True)


def wait_port(port: int, process: subprocess.Popen, seconds: float = 15.0) -> None:
    """Until something accepts connections on the loopback port, or the process has died."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and process.poll() is None:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"the SMTP sink did not start on port {port}")


class Sink:
    """The SMTP server both gunicorns use as their global server."""

    def __init__(self, kind: str, workdir: str) -> None:
        self.kind = kind
        self._counter_file = os.path.join(workdir, "smtp-sink.out")
        if kind == "smtp-sink":
            self.port = st.free_port()
            # -c: running counters ("sess=N quit=N mesg=N\r", flushed at each update); -a: no AUTH
            # offered. As root smtp-sink insists on dropping privileges (-u).
            user = ["-u", "nobody"] if os.geteuid() == 0 else []
            with open(self._counter_file, "wb") as out:
                self.process = subprocess.Popen(
                    [SMTP_SINK, *user, "-a", "-c", f"127.0.0.1:{self.port}", "1000"],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            wait_port(self.port, self.process)
            self.env = {
                "SMTP_HOST": "127.0.0.1",
                "SMTP_USER": "",
                "SMTP_PASS": "",
                "SMTP_SECURE": "false",
                "SMTP_REQUIRE_TLS": "false",
            }
            self.description = "Postfix smtp-sink (plain SMTP, no TLS, no AUTH)"
        else:
            self.process, self.port, ca_file = st.start_sink("aiosmtpd", workdir)
            self.env = {
                "SMTP_HOST": "localhost",
                "SMTP_USER": st.USER,
                "SMTP_PASS": st.PASSWORD,
                "SMTP_SECURE": "false",
                "SMTP_REQUIRE_TLS": "true",
                "SSL_CERT_FILE": ca_file,
            }
            self.description = "aiosmtpd, bench/smtp_sink.py (STARTTLS + AUTH)"
        self.env.update(
            SMTP_PORT=str(self.port),
            SMTP_FROM=SENDER,
            SMTP_HOST_ALLOWLIST="127.0.0.1/32,localhost",
        )

    def received(self) -> int | None:
        """Messages received so far, where the sink tells it while running (smtp-sink)."""
        if self.kind != "smtp-sink":
            return None
        with open(self._counter_file, "rb") as handle:
            counts = re.findall(rb"mesg=(\d+)", handle.read())
        return int(counts[-1]) if counts else 0

    def stop(self) -> int:
        """Stop the sink and return the number of messages it received."""
        if self.kind == "smtp-sink":
            self.process.terminate()
            self.process.wait(timeout=30)
            return self.received() or 0
        self.process.terminate()
        out, _ = self.process.communicate(timeout=30)
        return int(out.strip().splitlines()[-1])


@dataclass
class Server:
    """One gunicorn serving one checkout."""

    made: Checkout
    port: int
    process: subprocess.Popen
    log_path: str
    warm: list[dict[str, Any]] = field(default_factory=list)
    rounds: list[dict[str, Any]] = field(default_factory=list)

    @property
    def request(self) -> bytes:
        """The send-email request for this server, as bytes on the wire."""
        return st.send_request("127.0.0.1", self.port, st.token(ACCOUNT))


def start_server(
    made: Checkout,
    sink: Sink,
    workers: int,
    threads: int,
    workdir: str,
    log_level: str = "WARNING",
    access_log_as_configured: bool = False,
) -> Server:
    """Start gunicorn in the checkout with its own data folder; return it once it answers."""
    port = st.free_port()
    data_dir = os.path.join(workdir, f"data-{made.side}")
    os.makedirs(data_dir)
    env = {
        **os.environ,
        **sink.env,
        "PYTHON_DOTENV_DISABLED": "1",  # a .env in either checkout must not make them differ
        "PYTHONPATH": made.path,  # the checkout's smtp_service, whatever else is on the path
        "BIND": f"127.0.0.1:{port}",
        "PUBLIC_BASE_URL": f"http://127.0.0.1:{port}",
        "DATA_DIR": data_dir,
        "DATABASE_URL": f"sqlite:///{data_dir}/messages.sqlite3",  # older commits ignore it
        "JWT_SECRET_KEY": st.SECRET,
        "JWT_PUBLIC_KEY": "",
        "JWT_ALGORITHM": "HS256",
        "SMTP_ENCRYPTION_KEYS": st.new_key(),
        "WEB_CONCURRENCY": str(workers),
        "GUNICORN_THREADS": str(threads),
        "LOG_LEVEL": log_level,
    }
    env.pop("GUNICORN_CMD_ARGS", None)
    log_path = os.path.join(workdir, f"gunicorn-{made.side}.log")
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [
                os.path.join(VENV, "bin", "gunicorn"),
                "-c",
                "gunicorn.conf.py",
                "--no-control-socket",
                *([] if access_log_as_configured else ["--access-logfile", "/dev/null"]),
                "wsgi:app",
            ],
            cwd=made.path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = Server(made, port, process, log_path)
    try:
        st.wait_http(f"http://127.0.0.1:{port}/healthz", seconds=30)
    except RuntimeError:
        stop_server(server)
        with open(log_path, errors="replace") as handle:
            tail = handle.read()[-2000:]
        sys.exit(f"compare: gunicorn for {made.side} ({made.rev}) did not start:\n{tail}")
    return server


def use_own_settings(server: Server, sink: Sink) -> None:
    """Save SMTP settings for ACCOUNT that point at the sink (its own server, as an account
    would have; the sender is the settings' user)."""
    body = {
        "host": sink.env["SMTP_HOST"],
        "port": sink.port,
        "secure": False,
        "user": SENDER,
        "pass": st.PASSWORD,
        "requireTls": sink.kind != "smtp-sink",  # smtp-sink offers neither STARTTLS nor AUTH
    }
    st.api(f"http://127.0.0.1:{server.port}", "POST", "/api/smtp/settings", st.token(ACCOUNT), body)


def stop_server(server: Server) -> None:
    """Stop gunicorn gracefully, or kill its process group after 30 s."""
    if server.process.poll() is not None:
        return
    server.process.send_signal(signal.SIGTERM)
    try:
        server.process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait(timeout=10)


def worker_cpu(master: int) -> dict[int, int]:
    """CPU time (user + system, in clock ticks) of each gunicorn worker of the master."""
    pids = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(master)], capture_output=True, text=True, check=False
    ).stdout.split()
    ticks = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        ticks[int(pid)] = int(fields[11]) + int(fields[12])  # utime, stime
    return ticks


def measure(server: Server, args: argparse.Namespace, requests: int) -> dict[str, Any]:
    """One round against one server with the load generator of bench/send_throughput.py; the
    result also holds the workers' CPU time per request (ms) and the busiest worker's share."""
    coroutine = st.load(
        "127.0.0.1",
        server.port,
        server.request,
        requests,
        args.concurrency,
        args.per_connection or None,
    )
    before = worker_cpu(server.process.pid)
    try:
        result = asyncio.run(asyncio.wait_for(coroutine, args.round_timeout))
    except TimeoutError:
        sys.exit(
            f"compare: a round against {server.made.side} took more than "
            f"{args.round_timeout:.0f} s"
        )
    used = [t - before[pid] for pid, t in worker_cpu(server.process.pid).items() if pid in before]
    result["busiest"] = max(used) / sum(used) if sum(used) else None
    result["cpu"] = sum(used) / os.sysconf("SC_CLK_TCK") * 1000 / requests
    return result


def non_200(result: dict[str, Any]) -> int:
    """Answers other than 200 in one round."""
    return sum(n for status, n in result["statuses"].items() if status != 200)


def report(
    servers: list[Server], sink_description: str, received: int, args: argparse.Namespace
) -> bool:
    """Print the rounds, the medians and the ratio; return True when every check passed."""
    base, head = servers
    print(
        f"send-email, base {base.made.rev} ({base.made.sha}) vs head {head.made.rev} "
        f"({head.made.sha}); {sink_description}; gunicorn {args.workers} workers x "
        f"{args.threads} threads each; {args.requests} requests x {args.concurrency} "
        f"connections per round (a new connection every {args.per_connection or 'no'} "
        f"requests), {args.rounds} rounds alternating base/head; "
        f"{os.cpu_count()} CPUs"
    )
    print(
        f"{'round':<7}{'side':<6}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'non-200':>9}"
        f"{'sink got':>10}{'CPU ms/req':>11}{'busiest worker':>16}"
    )
    for i in range(args.rounds):
        for server in servers:
            r = server.rounds[i]
            got = "-" if r["delivered"] is None else str(r["delivered"])
            busiest = "-" if r["busiest"] is None else f"{r['busiest']:.0%} of CPU"
            print(
                f"{i + 1:<7}{server.made.side:<6}{r['rate']:>9.0f}{r['p50']:>9.1f}"
                f"{r['p99']:>9.1f}{non_200(r):>9}{got:>10}{r['cpu']:>11.2f}{busiest:>16}"
            )
    medians = {}
    for server in servers:
        keys = ("rate", "p50", "p99", "cpu")
        m = {k: statistics.median(r[k] for r in server.rounds) for k in keys}
        medians[server.made.side] = m
        print(
            f"{'median':<7}{server.made.side:<6}{m['rate']:>9.0f}{m['p50']:>9.1f}{m['p99']:>9.1f}"
            f"{'':>18}{m['cpu']:>11.2f}"
        )
    per_round = [h["rate"] / b["rate"] for b, h in zip(base.rounds, head.rounds, strict=True)]
    print(
        f"head/base req/s: {medians['head']['rate'] / medians['base']['rate']:.3f} (medians); "
        f"per round {' '.join(f'{x:.3f}' for x in per_round)} "
        f"(median {statistics.median(per_round):.3f}); "
        f"p50 {medians['head']['p50'] / medians['base']['p50']:.3f}, "
        f"p99 {medians['head']['p99'] / medians['base']['p99']:.3f}"
    )
    cpu_per_round = [h["cpu"] / b["cpu"] for b, h in zip(base.rounds, head.rounds, strict=True)]
    print(
        f"head/base workers' CPU per request: "
        f"{medians['head']['cpu'] / medians['base']['cpu']:.3f} (medians); per round "
        f"{' '.join(f'{x:.3f}' for x in cpu_per_round)} (less than 1: head is cheaper)"
    )
    bad = sum(non_200(r) for s in servers for r in [*s.rounds, *s.warm])
    ok = sum(r["statuses"].get(200, 0) for s in servers for r in [*s.rounds, *s.warm])
    print(f"non-200 answers: {bad}; 200 answers (with warm-up): {ok}; sink received {received}")
    passed = True
    if bad:
        print("FAILED: some answers were not 200 (see the gunicorn logs)")
        passed = False
    if received != ok:
        print("FAILED: the sink did not receive exactly one message per 200 answer")
        passed = False
    mismatched = [
        f"{s.made.side} round {i + 1}"
        for s in servers
        for i, r in enumerate(s.rounds)
        if r["delivered"] is not None and r["delivered"] != r["statuses"].get(200, 0)
    ]
    if mismatched:
        print(f"FAILED: delivered != 200 answers in {', '.join(mismatched)}")
        passed = False
    return passed


def main() -> None:
    """Check out both revisions, run the interleaved rounds, print the comparison."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", required=True, help="revision to compare against")
    parser.add_argument(
        "--head", default="worktree", help="revision, or 'worktree' for this working tree as it is"
    )
    parser.add_argument("--requests", type=int, default=2000, help="per round and side")
    parser.add_argument("--concurrency", type=int, default=16, help="keep-alive connections")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--per-connection",
        type=int,
        default=25,
        help="requests on one connection before a new one (0: one connection each for the "
        "whole round, so one worker may get most of them)",
    )
    parser.add_argument("--warmup", type=int, default=200, help="requests per side before round 1")
    parser.add_argument("--workers", type=int, default=2, help="WEB_CONCURRENCY")
    parser.add_argument("--threads", type=int, default=8, help="GUNICORN_THREADS")
    parser.add_argument("--sink", choices=["smtp-sink", "aiosmtpd"], default="smtp-sink")
    parser.add_argument(
        "--round-timeout", type=float, default=120, help="seconds; a longer round aborts the run"
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs)")
    parser.add_argument(
        "--route",
        choices=["global", "custom"],
        default="global",
        help="custom: the account saves settings for the sink, and sends through them",
    )
    parser.add_argument(
        "--log-level",
        default="WARNING",
        help="LOG_LEVEL of both sides (INFO: the request and send lines are written too)",
    )
    parser.add_argument(
        "--access-log-as-configured",
        action="store_true",
        help="each side's gunicorn access log as its gunicorn.conf.py says (to the log file), "
        "instead of both to /dev/null",
    )
    args = parser.parse_args()
    if min(args.requests, args.concurrency, args.rounds) < 1:
        parser.error("--requests, --concurrency and --rounds must be at least 1")
    if min(args.warmup, args.per_connection) < 0:
        parser.error("--warmup and --per-connection cannot be negative")
    if args.sink == "smtp-sink" and not os.access(SMTP_SINK, os.X_OK):
        sys.exit(f"compare: {SMTP_SINK} is missing: `make bench-deps` installs it (Debian postfix)")

    workdir = tempfile.mkdtemp(prefix="bench-compare-")
    made: list[Checkout] = []
    servers: list[Server] = []
    sink: Sink | None = None
    passed = False
    try:
        made = [checkout("base", args.base, workdir), checkout("head", args.head, workdir)]
        sink = Sink(args.sink, workdir)
        servers = [
            start_server(
                m, sink, args.workers, args.threads, workdir, args.log_level,
                args.access_log_as_configured,
            )
            for m in made
        ]
        if args.route == "custom":
            for server in servers:
                use_own_settings(server, sink)
        for server in servers:  # imports, first connections, pools; not in the figures
            if args.warmup:
                server.warm = [measure(server, args, args.warmup)]
        for _ in range(args.rounds):
            for server in servers:
                before = sink.received()
                result = measure(server, args, args.requests)
                after = sink.received()
                result["delivered"] = None if before is None or after is None else after - before
                server.rounds.append(result)
        for server in servers:
            stop_server(server)
        description, received = sink.description, sink.stop()
        sink = None
        passed = report(servers, description, received, args)
    finally:
        for server in servers:
            stop_server(server)
        if sink is not None:
            sink.stop()
        for m in made:
            remove_checkout(m)
        git("worktree", "prune")
        if args.keep:
            print(f"logs kept in {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    if not passed:
        sys.exit(1)


if __name__ == "__main__":
    main()
