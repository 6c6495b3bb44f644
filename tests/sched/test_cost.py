"""The cost model on hand-made profiles: interpolation, extrapolation, fits, defaults, JSON."""
import json
import subprocess
import sys

import pytest

from prism.env import profile_dir
from prism.sched.cost import (
    DefaultCosts,
    ModelProfile,
    ProfileCostModel,
    default_profile_path,
    load_profiles,
)

GIB = 1 << 30


def make_profile(prefill=(), decode=(), model="m", device="cpu", date="2026-01-01", **kw):
    base = dict(model=model, device=device, card="test card", dtype="float32", date=date,
                weight_bytes=2 * GIB, kv_bytes_per_token=1 << 17)
    base.update(kw)
    return ModelProfile(prefill=prefill, decode=decode, **base)


PREFILL = [(32, 0.010), (128, 0.020), (512, 0.060), (2048, 0.300)]


def linear_decode(a, b, c, batches=(1, 4, 16, 64), contexts=(128, 1024)):
    return [(bs, ctx, a + b * bs + c * bs * ctx) for bs in batches for ctx in contexts]


def test_cost_module_imports_no_torch():
    code = "import sys, prism.sched.cost; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


# ---- prefill ----------------------------------------------------------------------------
def test_prefill_is_exact_at_measured_points_and_linear_between():
    cost = ProfileCostModel({"m": make_profile(PREFILL)})
    for n, t in PREFILL:
        assert cost.prefill_time("m", n) == pytest.approx(t)
    assert cost.prefill_time("m", 80) == pytest.approx(0.015)
    assert cost.prefill_time("m", 320) == pytest.approx(0.040)


def test_prefill_extrapolates_linearly_and_is_never_negative():
    cost = ProfileCostModel({"m": make_profile(PREFILL)})
    slope = (0.300 - 0.060) / (2048 - 512)
    assert cost.prefill_time("m", 4096) == pytest.approx(0.300 + slope * 2048)
    # Below the shortest length: the first segment's line (a fixed overhead shows).
    first_slope = (0.020 - 0.010) / 96
    assert cost.prefill_time("m", 16) == pytest.approx(0.010 - first_slope * 16)
    assert cost.prefill_time("m", 0) == 0.0
    assert cost.prefill_time("m", -5) == 0.0
    # A steep first segment would cross zero: the proportional line takes over.
    steep = ProfileCostModel({"m": make_profile([(100, 0.001), (200, 0.100)])})
    for n in (1, 10, 50, 99):
        assert 0 < steep.prefill_time("m", n) <= 0.001
    assert steep.prefill_time("m", 50) == pytest.approx(0.0005)


def test_prefill_is_monotonic_even_on_noisy_profiles():
    noisy = [(32, 0.012), (128, 0.009), (512, 0.060), (1024, 0.058), (2048, 0.3)]
    for points in (PREFILL, noisy, [(256, 0.05)]):
        cost = ProfileCostModel({"m": make_profile(points)})
        times = [cost.prefill_time("m", n) for n in range(0, 5000, 7)]
        assert all(b >= a for a, b in zip(times, times[1:]))
        assert all(t > 0 for t in times[1:])


def test_prefill_past_a_flat_tail_still_grows():
    cost = ProfileCostModel({"m": make_profile([(128, 0.02), (512, 0.02)])})
    assert cost.prefill_time("m", 1024) == pytest.approx(0.04)  # 0.02 s / 512 tokens each


def test_single_point_prefill_scales_through_the_origin():
    cost = ProfileCostModel({"m": make_profile([(100, 0.01)])})
    assert cost.prefill_time("m", 50) == pytest.approx(0.005)
    assert cost.prefill_time("m", 300) == pytest.approx(0.03)


# ---- decode -----------------------------------------------------------------------------
def test_decode_fit_recovers_a_linear_profile_exactly():
    a, b, c = 0.012, 2e-4, 3e-7
    cost = ProfileCostModel({"m": make_profile(decode=linear_decode(a, b, c))})
    for bs, ctx, t in linear_decode(a, b, c):
        assert cost.decode_step_time("m", bs, bs * ctx) == pytest.approx(t, rel=1e-9)
    # between and beyond the grid, the same plane
    assert cost.decode_step_time("m", 8, 8 * 500) == pytest.approx(a + 8 * b + 4000 * c)
    assert cost.decode_step_time("m", 256, 256 * 4096) == pytest.approx(a + 256 * b + 256 * 4096 * c)


def test_decode_fit_matches_weighted_least_squares():
    np = pytest.importorskip("numpy")
    rng = np.random.default_rng(0)
    points = [(bs, ctx, t * (1 + 0.05 * rng.standard_normal()))
              for bs, ctx, t in linear_decode(0.01, 1e-4, 2e-7)]
    cost = ProfileCostModel({"m": make_profile(decode=points)})
    x = np.array([[1.0, bs, bs * ctx] for bs, ctx, _ in points])
    y = np.array([t for *_, t in points])
    coef, *_ = np.linalg.lstsq(x / y[:, None], np.ones_like(y), rcond=None)
    assert (coef >= 0).all()  # so the non-negative fit is the plain one
    for bs, ctx in [(1, 128), (7, 300), (64, 1024), (100, 2000)]:
        expected = max(coef @ [1.0, bs, bs * ctx], y.min())
        assert cost.decode_step_time("m", bs, bs * ctx) == pytest.approx(expected, rel=1e-6)


def test_decode_is_monotonic_and_clamped_even_when_noise_suggests_otherwise():
    # Context "costs" negative time here; the fit must not believe it.
    points = [(1, 128, 0.020), (1, 1024, 0.019), (8, 128, 0.024), (8, 1024, 0.023),
              (32, 128, 0.030), (32, 1024, 0.029)]
    cost = ProfileCostModel({"m": make_profile(decode=points)})
    for ctx in (64, 128, 1024, 8192):
        times = [cost.decode_step_time("m", bs, bs * ctx) for bs in range(1, 100)]
        assert all(b >= a for a, b in zip(times, times[1:]))
    for bs in (1, 8, 64):
        times = [cost.decode_step_time("m", bs, total) for total in range(0, 200_000, 997)]
        assert all(b >= a for a, b in zip(times, times[1:]))
    assert cost.decode_step_time("m", 1, 0) >= 0.019  # the smallest measured step
    assert cost.decode_step_time("m", 0, 0) == 0.0


def test_decode_with_one_context_length_still_fits():
    points = linear_decode(0.01, 0.0, 1e-6, contexts=(512,))
    cost = ProfileCostModel({"m": make_profile(decode=points)})
    for bs, ctx, t in points:
        assert cost.decode_step_time("m", bs, bs * ctx) == pytest.approx(t, rel=1e-6)


def test_single_decode_point_keeps_the_default_shape_through_it():
    cost = ProfileCostModel({"m": make_profile(decode=[(4, 256, 0.05)])})
    assert cost.decode_step_time("m", 4, 1024) == pytest.approx(0.05)
    assert cost.decode_step_time("m", 4, 100_000) > 0.05  # more KV to read
    assert cost.decode_step_time("m", 1, 10) == pytest.approx(0.05)  # floor: smallest measured


# ---- defaults ---------------------------------------------------------------------------
def test_defaults_follow_the_documented_formulas():
    d = DefaultCosts()
    cost = ProfileCostModel(defaults=d)
    cost.set_model_size("m", 2 * GIB, 1 << 17)
    params = GIB  # 16-bit weights
    assert cost.prefill_time("m", 1) == pytest.approx(2 * GIB / d.memory_bytes_per_s)
    assert cost.prefill_time("m", 4096) == pytest.approx(2 * params * 4096 / d.flops_per_s)
    assert cost.decode_step_time("m", 8, 8000) == pytest.approx(
        (2 * GIB + (1 << 17) * 8000) / d.memory_bytes_per_s)
    assert cost.activation_time("m") == pytest.approx(2 * GIB / d.h2d_bytes_per_s)


def test_defaults_scale_with_model_size():
    cost = ProfileCostModel()
    cost.set_model_size("small", GIB, 1 << 15)
    cost.set_model_size("big", 16 * GIB, 1 << 17)
    for fn in (lambda m: cost.prefill_time(m, 1), lambda m: cost.prefill_time(m, 2048),
               lambda m: cost.decode_step_time(m, 16, 16_000), cost.activation_time):
        assert fn("big") > fn("small") > 0
    gpu = ProfileCostModel(defaults=DefaultCosts.nvidia_h100())
    gpu.set_model_size("big", 16 * GIB, 1 << 17)
    assert gpu.decode_step_time("big", 16, 16_000) < cost.decode_step_time("big", 16, 16_000)


def test_profile_without_decode_points_uses_its_sizes_for_defaults():
    profile = make_profile(PREFILL, weight_bytes=4 * GIB, h2d_bytes_per_s=50e9)
    cost = ProfileCostModel({"m": profile})
    cost.set_model_size("m", 1, 1)  # a profile's own sizes win
    assert cost.decode_step_time("m", 1, 100) == pytest.approx(
        (4 * GIB + (1 << 17) * 100) / DefaultCosts().memory_bytes_per_s)
    assert cost.activation_time("m") == pytest.approx(4 * GIB / 50e9)
    assert cost.profile("m") is profile


def test_unknown_model_gets_small_fixed_costs_not_an_exception():
    d = DefaultCosts()
    cost = ProfileCostModel()
    assert cost.decode_step_time("nobody", 4, 400) == d.unknown_step_s
    assert cost.prefill_time("nobody", 100) == pytest.approx(
        d.unknown_step_s + 100 * d.unknown_prefill_s_per_token)
    assert cost.prefill_time("nobody", 0) == 0.0
    assert cost.activation_time("nobody") == d.unknown_activation_s
    assert cost.profile("nobody") is None


def test_satisfies_the_cost_model_protocol():
    from prism.sched.view import CostModel

    cost: CostModel = ProfileCostModel({"m": make_profile(PREFILL, linear_decode(0.01, 0, 0))})
    assert cost.prefill_time("m", 64) > 0 and cost.decode_step_time("m", 2, 64) > 0


# ---- files ------------------------------------------------------------------------------
def test_json_round_trip(tmp_path):
    profile = make_profile(PREFILL, linear_decode(0.01, 1e-4, 1e-7), h2d_bytes_per_s=5.3e10)
    assert ModelProfile.from_dict(json.loads(json.dumps(profile.to_dict()))) == profile
    path = profile.save(tmp_path / "sub" / "p.json")
    assert ModelProfile.load(path) == profile
    assert json.loads(path.read_text())["prefill_tokens_per_s"][0] == [32, 3200.0]
    # lists given in any order are stored sorted
    assert make_profile(list(reversed(PREFILL))).prefill == tuple(PREFILL)


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.pop("weight_bytes"), "missing key 'weight_bytes'"),
    (lambda d: d.update(prefill=[[32, -1.0]]), "bad prefill point"),
    (lambda d: d.update(decode=[[4]]), "bad value"),
    (lambda d: d.update(version=99), "unsupported profile version"),
])
def test_bad_profiles_are_refused_with_a_clear_message(tmp_path, mutate, message):
    raw = make_profile(PREFILL).to_dict()
    mutate(raw)
    with pytest.raises(ValueError, match=message):
        ModelProfile.from_dict(raw)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="bad.json"):
        ModelProfile.load(path)


def test_load_profiles_keys_by_model_newest_first_and_skips_junk(tmp_path):
    make_profile(PREFILL, model="a", date="2026-01-01").save(tmp_path / "a-old.json")
    newest = make_profile(PREFILL, model="a", date="2026-03-01")
    newest.save(tmp_path / "a-new.json")
    make_profile(PREFILL, model="b", device="cuda:0").save(tmp_path / "b.json")
    (tmp_path / "junk.json").write_text("{not json")
    found = load_profiles(tmp_path)
    assert set(found) == {"a", "b"} and found["a"] == newest
    assert set(load_profiles(tmp_path, device="cuda:0")) == {"b"}
    assert load_profiles(tmp_path / "missing") == {}
    cost = ProfileCostModel(found)
    assert cost.prefill_time("a", 32) == pytest.approx(0.010)


def test_default_profile_path(monkeypatch, tmp_path):
    monkeypatch.setenv("PRISM_PROFILE_DIR", str(tmp_path))
    path = default_profile_path(profile_dir(), "llama-3.1-8b:random", "cuda:0")
    assert path == tmp_path / "llama-3.1-8b-random-cuda-0.json"
    make_profile(PREFILL, model="llama-3.1-8b:random").save(path)
    assert set(load_profiles(profile_dir())) == {"llama-3.1-8b:random"}
    monkeypatch.delenv("PRISM_PROFILE_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert default_profile_path(profile_dir(), "/models/Qwen2.5-7B", "cpu") == (
        tmp_path / "home" / ".cache" / "prism" / "profiles" / "models-qwen2.5-7b-cpu.json")
