"""The capacity planner: its search, its classes, and answers that move the right way."""
import pytest

from prism.bench.report import uniform_slos
from prism.bench.trace import poisson_trace
from prism.bench.transforms import scale_rate
from prism.sim.costs import ProfileSet
from prism.sim.plan import ModelClass, Point, fewest_devices, model_classes, plan

RAW = {
    "devices": [{"device": "cuda:0", "memory": "24GiB"}],
    "models": [{"name": f"m{i}", "source": "llama-3.2-3b:random"} for i in range(4)]
    + [{"name": "big", "source": "qwen2.5-14b:random"}],
}


def point(n, ok):
    return Point("prism", 1, n, n, 1.0 if ok else 0.5, 1.0, 1.0 if ok else 0.5, runs=True)


@pytest.mark.parametrize("threshold", [1, 2, 3, 5, 6, 7, 8])
def test_search_finds_the_first_size_that_meets_the_target(threshold):
    asked = []

    def check(n):
        asked.append(n)
        return point(n, n >= threshold)

    found, points = fewest_devices("prism", ModelClass(1, ("a",)), 8, 0.99, check)
    assert found == threshold
    assert len(asked) == len(set(asked)) <= 6  # galloping then bisection, nothing twice
    assert [p.devices for p in points] == sorted(asked)


def test_a_point_meets_the_target_on_requests_meeting_both_slos():
    # 95% meet TTFT and 95% meet TPOT, but not the same 95%: only 90% meet both
    assert not Point("prism", 1, 1, 1, 0.95, 0.95, 0.90, runs=True).meets(0.95)
    assert Point("prism", 1, 1, 1, 0.95, 0.95, 0.95, runs=True).meets(0.95)
    assert Point("prism", 1, 1, 1, None, None, None, runs=True).meets(0.99)  # no traffic
    assert not Point("prism", 1, 1, 1, None, None, None, runs=False).meets(0.0)


def test_search_reports_none_when_even_the_largest_cluster_misses():
    found, points = fewest_devices("prism", ModelClass(1, ("a",)), 5, 0.99, lambda n: point(n, False))
    assert found is None and max(p.devices for p in points) == 5


def test_models_too_big_for_one_gpu_form_groups():
    classes = model_classes(RAW, group_weight_fraction=0.5)
    assert [(c.gpus, len(c.models)) for c in classes] == [(1, 4), (4, 1)]  # 27.5 GiB > 0.5 x 24 GiB x 2


def test_more_load_or_a_higher_target_never_needs_fewer_gpus():
    raw = {**RAW, "models": RAW["models"][:4]}
    base = poisson_trace({f"m{i}": 1.0 for i in range(4)}, 20.0, (256, 1024), (16, 128), seed=2)
    slos = uniform_slos([f"m{i}" for i in range(4)], 0.08, 0.02)
    answers = {}
    for scale, target in [(1, 0.9), (1, 0.99), (8, 0.99), (32, 0.99)]:
        result = plan(raw, scale_rate(base, scale), ["prism", "static"], slos, ProfileSet({}, {}),
                      target=target, max_gpus=8, jobs=1)
        answers[(scale, target)] = {s: e["gpus"] for s, e in result["policies"].items()}

    def gpus(key, system):
        return answers[key][system] if answers[key][system] is not None else 99

    for system in ("prism", "static"):
        assert gpus((1, 0.9), system) <= gpus((1, 0.99), system) <= gpus((8, 0.99), system) <= gpus((32, 0.99), system)
    assert gpus((32, 0.99), "prism") > gpus((1, 0.99), "prism")  # the load does move the answer
