"""An LRU of resident adapters, after vLLM's LRUCacheWorkerLoRAManager: evict before load, pin, fail loudly."""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Generic, Hashable, Iterable, TypeVar

K = TypeVar("K", bound=Hashable)


class AdapterLRU(Generic[K]):
    """Keeps at most `capacity` adapters loaded. `load(key)` and `unload(key)` do the real work."""

    def __init__(self, capacity: int, load: Callable[[K], None], unload: Callable[[K], None]):
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity = capacity
        self._load, self._unload = load, unload
        self._entries: OrderedDict[K, None] = OrderedDict()
        self.loads = 0
        self.evictions = 0

    def __contains__(self, key: K) -> bool:
        return key in self._entries

    def keys(self) -> list[K]:
        return list(self._entries)

    def ensure(self, keys: Iterable[K]) -> None:
        """Make every key resident at once; the keys are pinned against each other while loading."""
        wanted = list(dict.fromkeys(keys))
        if len(wanted) > self.capacity:
            raise RuntimeError(f"{len(wanted)} adapters requested in one batch but only {self.capacity} slots")
        pinned = set(wanted)
        for key in wanted:
            if key in self._entries:
                self._entries.move_to_end(key)
                continue
            while len(self._entries) >= self.capacity:
                victim = next(k for k in self._entries if k not in pinned)
                self.evict(victim)
            self._load(key)
            self._entries[key] = None
            self.loads += 1

    def evict(self, key: K) -> None:
        if key in self._entries:
            del self._entries[key]
            self._unload(key)
            self.evictions += 1
