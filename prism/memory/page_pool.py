"""The device's physical page budget, shared by every arena on it.

Budget rule: owned pages + spare pages (created, unowned) never exceed budget_pages.
Spares are single pages kept created ("warm") so that a one-page request, the common KV
growth step, mostly skips cuMemCreate. They count as free: a request that would otherwise
exceed the budget releases spares first. Refusals are answers, never exceptions.
"""
from __future__ import annotations

import collections
import inspect
import statistics
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable

from prism.memory.backend import MemoryBackend, PhysicalChunk

_LATENCY_WINDOW = 1024  # recent map/unmap timings kept for the stats


@dataclass(frozen=True)
class Owner:
    model_id: str
    kind: str  # "weights" or "kv"

    @property
    def key(self) -> str:
        return f"{self.model_id}/{self.kind}"


@dataclass
class PoolStats:
    """A snapshot. Latencies are (median, p99) in seconds over the last 1024 calls
    ((0.0, 0.0) before any); counts are since the pool was made."""

    budget_pages: int
    used_pages: int
    spare_pages: int
    free_pages: int
    pages_by_owner: dict[str, int] = field(default_factory=dict)  # key f"{model_id}/{kind}"
    num_maps: int = 0
    num_unmaps: int = 0
    map_latency_s: tuple[float, float] = (0.0, 0.0)
    unmap_latency_s: tuple[float, float] = (0.0, 0.0)
    num_refusals: int = 0
    num_creates: int = 0
    num_releases: int = 0
    num_spare_hits: int = 0


def _median_p99(samples) -> tuple[float, float]:
    if not samples:
        return (0.0, 0.0)
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return (statistics.median(ordered), p99)


class PagePool:
    """Hands physical chunks to owners within the budget and each owner's cap.

    Thread-safe: a lock guards the books (backend calls happen under it too, so a chunk
    is never counted twice)."""

    def __init__(
        self,
        backend: MemoryBackend,
        budget_pages: int,
        num_spare_pages: int = 4,
        clock=time.perf_counter,
    ):
        if budget_pages < 0 or num_spare_pages < 0:
            raise ValueError("budget_pages and num_spare_pages must be >= 0")
        self.backend = backend
        self.page_size = backend.page_size
        self.num_spare_pages = num_spare_pages
        self.clock = clock
        self._budget_pages = budget_pages
        self._lock = threading.RLock()
        self._owned: dict[Owner, int] = {}
        self._caps: dict[Owner, int] = {}
        self._holder: dict[int, Owner] = {}  # chunk handle -> owner, to catch bad frees
        self._spares: list[PhysicalChunk] = []
        self._used = 0
        self._map_times: collections.deque[float] = collections.deque(maxlen=_LATENCY_WINDOW)
        self._unmap_times: collections.deque[float] = collections.deque(maxlen=_LATENCY_WINDOW)
        self._counts = collections.Counter()
        self._reclaimers: list[Callable[[], Callable[[], None] | None]] = []  # weak where they can be
        self._deferred = 0  # pages whose owners deferred their unmapping (note_deferred)
        self._closed = False
        self.refill_spares()

    @property
    def budget_pages(self) -> int:
        return self._budget_pages

    # -- caps and queries -----------------------------------------------------------------
    def set_cap(self, owner: Owner, max_pages: int | None) -> None:
        """Limit owner to max_pages (None: only the budget limits it). Lowering a cap below
        what the owner holds takes nothing away; it only refuses further pages."""
        with self._lock:
            if max_pages is None:
                self._caps.pop(owner, None)
            elif max_pages < 0:
                raise ValueError(f"cap must be >= 0 or None, got {max_pages}")
            else:
                self._caps[owner] = max_pages

    def cap_of(self, owner: Owner) -> int | None:
        return self._caps.get(owner)

    def can_allocate(self, owner: Owner, num_pages: int) -> bool:
        with self._lock:
            if num_pages < 1 or self._closed:
                return False
            if self._used + num_pages > self._budget_pages:
                return False
            cap = self._caps.get(owner)
            return cap is None or self._owned.get(owner, 0) + num_pages <= cap

    def pages_of(self, owner: Owner) -> int:
        return self._owned.get(owner, 0)

    @property
    def used_pages(self) -> int:
        return self._used

    @property
    def free_pages(self) -> int:
        return self._budget_pages - self._used

    @property
    def spare_pages(self) -> int:
        return len(self._spares)

    def pages_by_owner(self) -> dict[Owner, int]:
        with self._lock:
            return {o: n for o, n in self._owned.items() if n}

    # -- allocate and free ----------------------------------------------------------------
    def allocate(self, owner: Owner, num_pages: int) -> PhysicalChunk | None:
        """One chunk of num_pages, or None (counted as a refusal) when over budget, over
        the owner's cap, or the device has no physical memory now."""
        if num_pages < 1:
            raise ValueError(f"num_pages must be >= 1, got {num_pages}")
        with self._lock:
            if not self.can_allocate(owner, num_pages):
                self._counts["refusals"] += 1
                return None
            chunk = self._take_spare() if num_pages == 1 else None
            if chunk is None:
                chunk = self._create_within_budget(num_pages)
            if chunk is None:
                self._counts["refusals"] += 1
                return None
            self._owned[owner] = self._owned.get(owner, 0) + num_pages
            self._used += num_pages
            self._holder[chunk.handle] = owner
            return chunk

    def add_reclaimer(self, reclaim: Callable[[], None]) -> None:
        """Register an owner's way to give back pages whose unmapping it deferred (until the
        device has passed the kernels that used them): run before the pool says it is full.
        A bound method is held weakly: registering does not keep its owner alive."""
        ref = weakref.WeakMethod(reclaim) if inspect.ismethod(reclaim) else (lambda: reclaim)
        with self._lock:
            self._reclaimers.append(ref)

    def remove_reclaimer(self, reclaim: Callable[[], None]) -> None:
        with self._lock:
            self._reclaimers = [r for r in self._reclaimers if r() not in (None, reclaim)]

    def note_deferred(self, num_pages: int) -> None:
        """An owner deferred unmapping `num_pages` pages (negative: it unmapped or kept them
        since). While none are, reclaim() costs one look: it runs on every room query."""
        with self._lock:
            self._deferred += num_pages

    def reclaim(self) -> None:
        """Run every owner's reclaimer (without waiting for the device) if any page waits.
        Not under the pool's lock: a reclaimer takes its own lock, then the pool's as it frees."""
        if not self._deferred:
            return
        with self._lock:
            reclaimers = [r() for r in self._reclaimers]
        for reclaim in reclaimers:
            if reclaim is not None:
                reclaim()

    def note_refusal(self) -> None:
        """Count a request refused by a caller that asked can_allocate() first."""
        with self._lock:
            self._counts["refusals"] += 1

    def _take_spare(self) -> PhysicalChunk | None:
        if not self._spares:
            return None
        self._counts["spare_hits"] += 1
        return self._spares.pop()

    def _create_within_budget(self, num_pages: int) -> PhysicalChunk | None:
        # Make room under the budget from the spares, then ask the device. If the device
        # itself is short, the spares' physical memory is what we can give it back.
        while self._spares and self._used + len(self._spares) + num_pages > self._budget_pages:
            self._release(self._spares.pop())
        chunk = self._create(num_pages)
        if chunk is None and self._spares:
            while self._spares:
                self._release(self._spares.pop())
            chunk = self._create(num_pages)
        return chunk

    def free(self, owner: Owner, chunk: PhysicalChunk) -> None:
        """Give a chunk back: one-page chunks refill the spares, the rest are released."""
        with self._lock:
            holder = self._holder.get(chunk.handle)
            if holder != owner:
                raise ValueError(f"{chunk} is not held by {owner} (held by {holder})")
            del self._holder[chunk.handle]
            self._owned[owner] -= chunk.num_pages
            self._used -= chunk.num_pages
            if (
                chunk.num_pages == 1
                and not self._closed
                and len(self._spares) < self.num_spare_pages
            ):
                self._spares.append(chunk)
            else:
                self._release(chunk)

    def refill_spares(self) -> int:
        """Create spares up to num_spare_pages within the budget; returns how many were made.
        Call it off the critical path (e.g. while the GPU runs a step)."""
        made = 0
        with self._lock:
            while (
                not self._closed
                and len(self._spares) < self.num_spare_pages
                and self._used + len(self._spares) < self._budget_pages
            ):
                chunk = self._create(1)
                if chunk is None:
                    break
                self._spares.append(chunk)
                made += 1
        return made

    def set_budget(self, budget_pages: int) -> None:
        """Change the budget (e.g. after measuring the device). Pages already owned stay
        owned; spares above the new budget are released."""
        if budget_pages < 0:
            raise ValueError("budget_pages must be >= 0")
        with self._lock:
            self._budget_pages = budget_pages
            while self._spares and self._used + len(self._spares) > budget_pages:
                self._release(self._spares.pop())

    def _create(self, num_pages: int) -> PhysicalChunk | None:
        chunk = self.backend.create(num_pages)
        if chunk is not None:
            self._counts["creates"] += 1
        return chunk

    def _release(self, chunk: PhysicalChunk) -> None:
        self.backend.release(chunk)
        self._counts["releases"] += 1

    # -- timings and stats ----------------------------------------------------------------
    def record_map(self, seconds: float) -> None:
        self._counts["maps"] += 1
        self._map_times.append(seconds)

    def record_unmap(self, seconds: float) -> None:
        self._counts["unmaps"] += 1
        self._unmap_times.append(seconds)

    def stats(self) -> PoolStats:
        with self._lock:
            c = self._counts
            return PoolStats(
                budget_pages=self._budget_pages,
                used_pages=self._used,
                spare_pages=len(self._spares),
                free_pages=self.free_pages,
                pages_by_owner={o.key: n for o, n in self._owned.items() if n},
                num_maps=c["maps"],
                num_unmaps=c["unmaps"],
                map_latency_s=_median_p99(self._map_times),
                unmap_latency_s=_median_p99(self._unmap_times),
                num_refusals=c["refusals"],
                num_creates=c["creates"],
                num_releases=c["releases"],
                num_spare_hits=c["spare_hits"],
            )

    def close(self) -> None:
        """Release the spares. Owned chunks stay with their arenas, which free them."""
        with self._lock:
            self._closed = True
            while self._spares:
                self._release(self._spares.pop())
