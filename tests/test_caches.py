"""The per-worker LRU: bounded, least recently used first, safe across threads."""

from __future__ import annotations

import threading

from smtp_service.caches import LRUCache


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
