"""A bounded mapping in memory, least recently used entries dropped; safe to share between threads.

Used for the kernel choices per bank and the global router's recent queries. Thirty lines over `OrderedDict` with a
lock: not worth a dependency (cachetools) of its own.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Hashable, Iterator, Optional


class LRUCache:
    """At most `capacity` entries; a `get` marks its entry used, a `put` past the capacity drops the oldest."""

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be at least 0, got {capacity}.")
        self.capacity = capacity
        self._entries: OrderedDict[Hashable, Any] = OrderedDict()
        self._lock = threading.Lock()  # shared by threads: lookups reorder, insertions evict

    def get(self, key: Hashable) -> Optional[Any]:
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value

    def put(self, key: Hashable, value: Any) -> None:
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()

    def keys(self) -> Iterator[Hashable]:
        """The keys, least recently used first (a copy: safe while others use the cache)."""
        with self._lock:
            return iter(list(self._entries))

    def __len__(self) -> int:
        return len(self._entries)

    def __getstate__(self) -> dict:  # copied and pickled with models and routers: a lock is not, a fresh one is made
        return {key: value for key, value in self.__dict__.items() if key != "_lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
