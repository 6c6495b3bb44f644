"""Moore-Hodgson against brute force over all subsets, plus edge cases."""
import itertools
import random

import pytest

from prism.sched.moore_hodgson import Job, edd_order, is_feasible, moore_hodgson


def brute_force_max_on_time(jobs: list[Job], start: float) -> int:
    """Largest subset feasible in EDD order (EDD is optimal for a fixed subset)."""
    for size in range(len(jobs), 0, -1):
        for subset in itertools.combinations(jobs, size):
            if is_feasible(edd_order(subset), start):
                return size
    return 0


def random_jobs(rng: random.Random, n: int) -> list[Job]:
    # Quarter-second grid: sums stay exact in binary floating point, so brute force and the
    # algorithm compare the very same numbers.
    return [
        Job(f"j{i}", processing_time=rng.randint(0, 12) / 4, deadline=rng.randint(-4, 40) / 4)
        for i in range(n)
    ]


def check(jobs: list[Job], start: float) -> tuple[list[Job], list[Job]]:
    on_time, rest = moore_hodgson(jobs, start)
    assert sorted(j.job_id for j in on_time + rest) == sorted(j.job_id for j in jobs)
    assert on_time == edd_order(on_time), "on-time set must come back in EDD order"
    assert is_feasible(on_time, start)
    return on_time, rest


@pytest.mark.parametrize("seed", range(4))
def test_matches_brute_force_on_random_instances(seed):
    rng = random.Random(seed)
    for _ in range(150):
        jobs = random_jobs(rng, rng.randint(0, 8))
        start = rng.randint(-2, 4) / 4
        on_time, _ = check(jobs, start)
        assert len(on_time) == brute_force_max_on_time(jobs, start), (jobs, start)


def test_matches_brute_force_with_hypothesis():
    hypothesis = pytest.importorskip("hypothesis")
    st = pytest.importorskip("hypothesis.strategies")

    job = st.builds(
        lambda p, d: (p / 4, d / 4), st.integers(0, 12), st.integers(-4, 40)
    )

    @hypothesis.settings(max_examples=300, deadline=None)
    @hypothesis.given(st.lists(job, max_size=8), st.integers(-2, 4))
    def run(pairs, start_q):
        jobs = [Job(f"j{i}", p, d) for i, (p, d) in enumerate(pairs)]
        on_time, _ = check(jobs, start_q / 4)
        assert len(on_time) == brute_force_max_on_time(jobs, start_q / 4)

    run()


def test_empty():
    assert moore_hodgson([], 0.0) == ([], [])


def test_all_feasible_keeps_everything_in_edd_order():
    jobs = [Job("c", 1.0, 10.0), Job("a", 1.0, 3.0), Job("b", 1.0, 2.0)]
    on_time, rest = moore_hodgson(jobs, 0.0)
    assert [j.job_id for j in on_time] == ["b", "a", "c"]
    assert rest == []


def test_none_feasible():
    jobs = [Job("a", 5.0, 3.0), Job("b", 2.0, 1.0)]
    on_time, rest = moore_hodgson(jobs, 0.0)
    assert on_time == []
    assert sorted(j.job_id for j in rest) == ["a", "b"]


def test_start_time_shifts_feasibility():
    jobs = [Job("a", 1.0, 5.0)]
    assert moore_hodgson(jobs, 3.0)[0] == jobs
    assert moore_hodgson(jobs, 4.5)[0] == []


def test_drops_the_longest_job_not_the_latest():
    # s2 is the job that overflows, but dropping the long job saves both short ones.
    jobs = [Job("long", 3.0, 3.0), Job("s1", 1.0, 4.0), Job("s2", 1.0, 4.0)]
    on_time, rest = moore_hodgson(jobs, 0.0)
    assert [j.job_id for j in on_time] == ["s1", "s2"]
    assert [j.job_id for j in rest] == ["long"]


def test_equal_deadlines_are_deterministic_by_job_id():
    jobs = [Job("b", 1.0, 1.0), Job("a", 1.0, 1.0), Job("c", 1.0, 1.0)]
    for perm in itertools.permutations(jobs):
        on_time, rest = moore_hodgson(list(perm), 0.0)
        # One fits; on a tie the job latest in EDD order (largest id) is dropped first.
        assert [j.job_id for j in on_time] == ["a"]
        assert sorted(j.job_id for j in rest) == ["b", "c"]


def test_tie_key_decides_equal_deadlines():
    jobs = [Job("a", 1.0, 1.0), Job("b", 1.0, 1.0)]
    prefer_b = {"a": 1, "b": 0}
    on_time, _ = moore_hodgson(jobs, 0.0, tie_key=lambda j: prefer_b[j.job_id])
    assert [j.job_id for j in on_time] == ["b"]
