"""Per-worker caches: a locked LRU, and parsed files reused while the file is unchanged."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class LRUCache(Generic[K, V]):
    """A mapping of at most `size` entries that drops the least recently used first.

    Safe to share between threads: every operation holds one lock for a few dict operations.
    A size of 0 (or less) keeps nothing. Values are never None (get() answers None for a miss).
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        """The value (now the most recently used), or None when it is not kept."""
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: K, value: V) -> None:
        """Keep `value` as the most recently used, dropping the oldest beyond the size."""
        if self.size <= 0:
            return
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    def discard(self, key: K) -> None:
        """Forget `key` if it is kept."""
        with self._lock:
            self._items.pop(key, None)

    def __len__(self) -> int:
        return len(self._items)


# What identifies one version of a file that is always replaced whole (write to a temporary
# file, rename): a new inode, and new times and size.
FileVersion = tuple[int, int, int, int]


class FileCache(Generic[V]):
    """What was parsed from a file, reused while the file is unchanged; LRU-bounded.

    Every get() looks at the file (one stat), so a change made by another worker or instance is
    seen at once; only the parsing is skipped. The file is stat'ed before it is read, so a
    version replaced meanwhile is cached under the older signature and read again next time.
    """

    def __init__(self, size: int) -> None:
        self._entries: LRUCache[str, tuple[FileVersion, V]] = LRUCache(size)

    def get(self, key: str, path: str, load: Callable[[], V | None]) -> V | None:
        """The value for the file at `path`: cached while unchanged, else `load()`.

        None (and nothing cached) when the file does not exist or `load` returns None; what
        `load` raises is raised and nothing is cached.
        """
        try:
            st = os.stat(path)
        except FileNotFoundError:
            self._entries.discard(key)
            return None
        version = (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size)
        cached = self._entries.get(key)
        if cached is not None and cached[0] == version:
            return cached[1]
        value = load()
        if value is None:
            self._entries.discard(key)
        else:
            self._entries.put(key, (version, value))
        return value

    def discard(self, key: str) -> None:
        """Forget the value for `key` (after this worker changed the file)."""
        self._entries.discard(key)
