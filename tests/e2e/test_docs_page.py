"""The API documentation page (/api/docs/, Swagger UI served by the service itself) rendered
by a real headless Chromium (Debian's, installed by `make browser-deps`): the page the
browser built lists the API's operations, read from the generated OpenAPI document."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.e2e.conftest import LiveService

CHROMIUM = "/usr/bin/chromium"
# No network but the service's loopback port: nothing may come from elsewhere.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--virtual-time-budget=20000",  # run the page's scripts and fetches before dumping
]


def rendered_dom(url: str, profile: Path) -> str:
    """The DOM Chromium holds after loading `url` and running its scripts."""
    if not (os.path.exists(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.skip(f"{CHROMIUM} is not installed (make browser-deps installs it as root)")
    profile.mkdir()
    done = subprocess.run(
        [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", url],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_docs_page_lists_the_operations(live_service: LiveService, tmp_path: Path):
    live = live_service
    mark = len(live.log_text())
    dom = rendered_dom(f"{live.base_url}/api/docs/", tmp_path / "chromium-profile")
    assert 'class="swagger-ui' in dom, dom[:2000]
    # every documented operation is on the page, rendered by Swagger UI from the document
    document = live.request("GET", "/api/openapi.json").json
    for path, operations in document["paths"].items():
        for method in operations:
            assert re.search(
                rf'data-path="{re.escape(path)}"', dom
            ), f"{method.upper()} {path} is not on the rendered page"
    assert "/api/messages/send-email" in dom and "opblock-post" in dom
    assert "smtp-service" in dom  # the document's title
    # the browser fetched the page, its scripts and the document from the service itself
    fetched = {line["path"] for line in live.request_lines(mark)}
    assert {"/api/docs/", "/api/docs/swagger-ui-bundle.js", "/api/openapi.json"} <= fetched
    shutil.rmtree(tmp_path / "chromium-profile", ignore_errors=True)
