"""Moore-Hodgson: the largest set of jobs one machine can finish by their deadlines.

Classic O(n log n) algorithm for 1 || sum U_j (minimize the number of late jobs): walk the jobs
in EDD order (earliest deadline first), add each to the schedule, and whenever the running
completion time passes the current job's deadline, drop the longest job scheduled so far.
Dropping the longest frees the most time while losing exactly one job, which is why the
greedy choice is optimal.
"""
from __future__ import annotations

import heapq
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Job:
    job_id: str
    processing_time: float
    deadline: float


def _by_id(job: Job) -> Hashable:
    return job.job_id


def edd_order(jobs: Iterable[Job], tie_key: Callable[[Job], Hashable] = _by_id) -> list[Job]:
    """Earliest deadline first; equal deadlines by `tie_key` (job_id unless told otherwise)."""
    return sorted(jobs, key=lambda j: (j.deadline, tie_key(j)))


def moore_hodgson(
    jobs: Iterable[Job],
    start_time: float,
    tie_key: Callable[[Job], Hashable] = _by_id,
) -> tuple[list[Job], list[Job]]:
    """Split `jobs` into (on time, in EDD order; the rest, in the order they were dropped).

    The on-time set is as large as possible: run back to back from `start_time` in EDD order,
    every job in it completes by its deadline. `tie_key` orders jobs of equal deadline (the
    local scheduler passes request priority there); among jobs of equal length, the one
    latest in EDD order is dropped first, so ties resolve deterministically and in favour of
    what `tie_key` ranks first.
    """
    ordered = edd_order(jobs, tie_key)
    # Max-heap on processing time: (-processing_time, -edd_index) so that, among equal
    # lengths, the latest job in EDD order is dropped.
    heap: list[tuple[float, int]] = []
    dropped: list[Job] = []
    finish = start_time
    for index, job in enumerate(ordered):
        heapq.heappush(heap, (-job.processing_time, -index))
        finish += job.processing_time
        if finish > job.deadline:
            _, neg_index = heapq.heappop(heap)
            longest = ordered[-neg_index]
            finish -= longest.processing_time
            dropped.append(longest)
    kept = sorted(-neg_index for _, neg_index in heap)
    return [ordered[i] for i in kept], dropped


def is_feasible(jobs: Iterable[Job], start_time: float) -> bool:
    """Whether `jobs`, run back to back from `start_time` in the given order, all meet deadlines."""
    finish = start_time
    for job in jobs:
        finish += job.processing_time
        if finish > job.deadline:
            return False
    return True
