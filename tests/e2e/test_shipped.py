"""Trying it as shipped (issue #12, item 6): `make run` in a copy of the tree, then the README's
Postman collection and environment run by newman with only `baseUrl` and `jwtSecret` (read from
the `.env` that `make run` made, with the README's command) given; then again with `make
postman`, since a user runs it again against the same service. Nothing else runs: the
development mail catcher that `make run` starts is every SMTP server the collection needs.

The copy (tracked and new files of this checkout, .venv and node_modules linked) keeps `make
run`'s .env and data/ out of the repository; only BIND and DEV_SMTP_PORT are set, to free ports.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.conftest import _KNOWN_VARIABLES, REPO_ROOT, _dotenv_names, free_port
from tests.e2e.test_newman import assert_run_green, require_newman, run_newman

pytestmark = pytest.mark.e2e

START_TIMEOUT = 60.0  # make, a new .env, gunicorn and the catcher on a loaded machine
STOP_TIMEOUT = 25.0

# The README's command for the collection's jwtSecret.
README_SECRET_COMMAND = "sed -n 's/^JWT_SECRET_KEY=//p' .env"


def _tree_files() -> list[str]:
    """The checkout's tracked files and new files not ignored (what a clone of this commit,
    with this working tree's changes, holds)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return [name for name in listed.split("\0") if name and (REPO_ROOT / name).is_file()]


def copy_tree(target: Path) -> Path:
    """A copy of the checkout at `target` with .venv and node_modules linked to this one's.
    The requirements files are dated before the virtualenv's install stamp (and package.json
    before newman), so that make uses the installed .venv and node_modules as they are (it
    would run pip or npm in the shared folders otherwise)."""
    if shutil.which("git") is None or not (REPO_ROOT / ".git").exists():
        pytest.skip("not a git checkout: cannot tell which files a clone would have")
    for name in _tree_files():
        destination = target / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / name, destination)
    for linked in (".venv", "node_modules"):
        (target / linked).symlink_to((REPO_ROOT / linked).resolve(), target_is_directory=True)
    stamp = REPO_ROOT / ".venv" / ".installed"
    if stamp.exists():
        before = stamp.stat().st_mtime - 60
        for requirements in target.glob("requirements*.txt"):
            os.utime(requirements, (before, before))
    newman = REPO_ROOT / "node_modules" / ".bin" / "newman"
    if newman.exists():  # likewise `make postman` would run npm install in the shared folder
        before = newman.stat().st_mtime - 60
        os.utime(target / "package.json", (before, before))
    return target


def _snapshot(path: Path) -> object:
    """What is at `path` (names, sizes and times of a folder's files; a file's): to show that
    `make run` in the copy left the repository's own .env and data/ alone."""
    if not path.exists():
        return None
    if path.is_file():
        stat = path.stat()
        return (stat.st_size, stat.st_mtime_ns)
    return sorted(
        (str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns)
        for p in path.rglob("*")
        if p.is_file()
    )


@dataclass
class MadeRun:
    """`make run` running in a copy of the tree."""

    tree: Path
    base_url: str
    catcher_port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def interrupt(self) -> int | None:
        """Ctrl-C, as in the terminal: SIGINT to make's process group (make, gunicorn and its
        workers, the catcher); SIGKILL to the group if it is still there after STOP_TIMEOUT."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGINT)
            try:
                self.process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.process.wait(timeout=5)
        return self.process.returncode


def _environment(port: int, catcher_port: int) -> dict[str, str]:
    """This process's environment without any service variable (so that the .env `make run`
    makes is what configures the service), with BIND and DEV_SMTP_PORT on free ports (0: not
    set)."""
    names = set(_KNOWN_VARIABLES) | _dotenv_names(REPO_ROOT / ".env.example")
    env = {k: v for k, v in os.environ.items() if k not in names}
    for name in ("GUNICORN_CMD_ARGS", "MAKEFLAGS", "MFLAGS", "MAKELEVEL", "SSL_CERT_FILE"):
        env.pop(name, None)
    env["PYTHONUNBUFFERED"] = "1"
    if port:
        env.update(BIND=f"127.0.0.1:{port}", DEV_SMTP_PORT=str(catcher_port))
    return env


def _wait_healthy(made: MadeRun) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if made.process.poll() is not None:
            pytest.fail(f"make run exited with {made.process.returncode}:\n{made.log()[-4000:]}")
        try:
            with urllib.request.urlopen(made.base_url + "/healthz", timeout=1.0) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    pytest.fail(f"make run did not answer /healthz within {START_TIMEOUT:.0f} s:\n{made.log()}")


@pytest.fixture
def made_run(tmp_path: Path) -> Iterator[MadeRun]:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    tree = copy_tree(tmp_path / "smtp-service")
    port, catcher_port = free_port(), free_port()
    log_path = tmp_path / "make-run.log"
    with open(log_path, "wb") as log_file:
        process = subprocess.Popen(
            ["make", "run"],
            cwd=tree,
            env=_environment(port, catcher_port),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, as a terminal gives it
        )
    made = MadeRun(tree, f"http://127.0.0.1:{port}", catcher_port, process, log_path)
    try:
        _wait_healthy(made)
        yield made
    finally:
        made.interrupt()


@pytest.mark.timeout(360)  # make, gunicorn and two newman runs (each with the 5 s slow accept)
def test_the_shipped_collection_runs_green_against_make_run(
    made_run: MadeRun, tmp_path: Path
) -> None:
    require_newman()
    repository_state = {name: _snapshot(REPO_ROOT / name) for name in (".env", "data")}
    secret = subprocess.run(
        README_SECRET_COMMAND, shell=True, cwd=made_run.tree, capture_output=True, text=True,
        check=True,
    ).stdout.strip()
    assert len(secret) >= 32, "make run made no .env with a JWT_SECRET_KEY"
    env_vars = {"baseUrl": made_run.base_url, "jwtSecret": secret}

    run, output = run_newman(env_vars, tmp_path / "report.json", cwd=made_run.tree)
    assert_run_green(run, output)
    # Again, as the README's `make postman` runs it (newman exits non-zero on any failure): it
    # finds the first run's messages and suppressions.
    again = subprocess.run(
        ["make", "postman", f"BASE_URL={made_run.base_url}"],
        cwd=made_run.tree,
        env=_environment(0, 0),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert again.returncode == 0, again.stdout + again.stderr
    assert "npm install" not in again.stdout  # the shared node_modules was left alone

    outbox = made_run.tree / "data" / "outbox"
    assert len(list(outbox.glob("*.eml"))) == 22  # eleven accepted messages a run (as test_newman)
    assert "development mail catcher" in made_run.log()
    assert secret not in made_run.log()
    assert made_run.interrupt() is not None
    with socket.socket() as sock:  # Ctrl-C stopped the catcher with the service
        assert sock.connect_ex(("127.0.0.1", made_run.catcher_port)) != 0
    assert {name: _snapshot(REPO_ROOT / name) for name in (".env", "data")} == repository_state
