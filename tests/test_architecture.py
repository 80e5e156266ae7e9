"""The direction of imports (.importlinter): api -> services -> storage, and nothing below the
HTTP edge imports Flask or the edge's errors. A broken contract fails this test."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / ".importlinter"


def _lint(root: Path) -> subprocess.CompletedProcess[str]:
    """Run import-linter on the smtp_service package found in `root`."""
    code = (
        "import sys; from importlinter.cli import lint_imports; "
        f"sys.exit(lint_imports(config_filename={str(CONFIG)!r}, no_cache=True))"
    )
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=root,
        env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_import_contracts_are_kept():
    result = _lint(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_a_flask_import_in_a_service_breaks_them(tmp_path):
    """The contract has teeth: the same check fails on a copy with one service importing Flask."""
    copy = tmp_path / "smtp_service"
    shutil.copytree(REPO / "smtp_service", copy, ignore=shutil.ignore_patterns("__pycache__"))
    senders = copy / "services" / "senders.py"
    senders.write_text(senders.read_text() + "\nfrom flask import current_app  # noqa\n")
    result = _lint(tmp_path)
    assert result.returncode != 0
    assert "services and storage know no Flask and no HTTP edge BROKEN" in result.stdout
    assert "smtp_service.services.senders -> flask" in result.stdout
