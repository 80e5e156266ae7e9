"""When each SMTP server last refused a new connection, told to every worker and instance.

Servers that limit connections per client count all of this deployment's connections as one
client's; a worker whose new connection was refused notes it here, and every worker's pool reads
the note and stops keeping idle connections to that server (services/pool.py). One empty file per
server under DATA_DIR/pool-refusals/, named by a digest of "host:port", its modification time the
last refusal: a utime when a refusal happens and a stat per server with idle connections every
few seconds, shared wherever DATA_DIR is.
"""

from __future__ import annotations

import hashlib
import logging
import os

log = logging.getLogger(__name__)

FOLDER = "pool-refusals"


class RefusalBoard:
    """Refusals of new SMTP connections, by server ("host:port"), in a folder of DATA_DIR."""

    def __init__(self, data_dir: str) -> None:
        self.folder = os.path.join(data_dir, FOLDER)

    def _path(self, server: str) -> str:
        return os.path.join(self.folder, hashlib.sha256(server.encode()).hexdigest()[:32])

    def note(self, server: str) -> None:
        """Record a refusal now; a failure to write is logged and otherwise ignored (the note
        only makes other workers give connections up sooner)."""
        path = self._path(server)
        try:
            os.makedirs(self.folder, mode=0o700, exist_ok=True)
            with open(path, "a"):
                pass
            os.utime(path)
        except OSError as exc:
            log.warning("cannot note an SMTP connection refusal: %s", exc.strerror)

    def last(self, server: str) -> float | None:
        """When the server last refused a connection (time.time() seconds), None if never or
        unreadable."""
        try:
            return os.stat(self._path(server)).st_mtime
        except OSError:
            return None
