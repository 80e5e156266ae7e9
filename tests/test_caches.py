"""The per-worker caches: a locked LRU, and parsed files reused while the file is unchanged."""

from __future__ import annotations

import os
import threading

import pytest

from smtp_service.caches import FileCache, LRUCache


def test_lru_drops_the_least_recently_used():
    cache: LRUCache[str, int] = LRUCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1  # a is now the most recent
    cache.put("c", 3)
    assert cache.get("b") is None and cache.get("a") == 1 and cache.get("c") == 3
    cache.discard("a")
    cache.discard("missing")
    assert len(cache) == 1


def test_size_zero_keeps_nothing():
    cache: LRUCache[str, int] = LRUCache(0)
    cache.put("a", 1)
    assert cache.get("a") is None and len(cache) == 0


def test_concurrent_use_stays_bounded_and_never_raises():
    cache: LRUCache[int, int] = LRUCache(50)
    errors: list[BaseException] = []

    def worker(offset: int) -> None:
        try:
            for i in range(5000):
                cache.put(offset + i, i)
                cache.get(offset + i - 7)
                if i % 3 == 0:
                    cache.discard(offset + i - 1)
        except BaseException as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(n * 100_000,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(cache) <= 50


def _replace(path, text: str) -> None:
    """Replace the file whole, as the service's writers do (a new inode)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


def test_file_cache_parses_once_per_version(tmp_path):
    path = tmp_path / "doc.json"
    loads: list[str] = []

    def load() -> str:
        text = path.read_text()
        loads.append(text)
        return text

    cache: FileCache[str] = FileCache(10)
    assert cache.get("k", str(path), load) is None  # no file: nothing loaded
    _replace(path, "one")
    assert cache.get("k", str(path), load) == "one"
    assert cache.get("k", str(path), load) == "one"
    assert loads == ["one"]
    _replace(path, "two!")  # another worker's save
    assert cache.get("k", str(path), load) == "two!"
    assert loads == ["one", "two!"]
    os.unlink(path)
    assert cache.get("k", str(path), load) is None


def test_file_cache_keeps_no_failure(tmp_path):
    path = tmp_path / "doc.json"
    _replace(path, "x")
    calls = []

    def broken() -> str:
        calls.append(1)
        raise ValueError("unparseable")

    cache: FileCache[str] = FileCache(10)
    for _ in range(2):
        with pytest.raises(ValueError):
            cache.get("k", str(path), broken)
    assert len(calls) == 2
