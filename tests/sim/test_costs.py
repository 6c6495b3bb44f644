"""Step costs of simulated devices: measured profiles, scaled ones, roofline, TP groups."""
import dataclasses

import pytest

from prism.config import ModelSpec
from prism.sched.cost import DefaultCosts, ModelProfile, ProfileCostModel
from prism.sim.costs import (TP_DECODE_PARALLEL_FRACTION, ProfileSet, roofline_profile, scale_profile,
                             step_seconds, tp_profile)
from prism.sim.shapes import model_shape

H100 = DefaultCosts.nvidia_h100()


def shape(name):
    return model_shape(ModelSpec(name, f"{name}:random"), "cuda:0")


def measured_8b(overhead_s=0.0):
    s = shape("llama-3.1-8b")
    p = roofline_profile(s, H100, "H100", "cuda:0")
    add = lambda t: t + overhead_s  # noqa: E731
    return dataclasses.replace(p, model=s.source, prefill=[(n, add(t)) for n, t in p.prefill],
                               decode=[(b, c, add(t)) for b, c, t in p.decode])


def test_scaling_a_roofline_profile_gives_the_other_models_roofline():
    ref, small = shape("llama-3.1-8b"), shape("llama-3.2-1b")
    scaled = scale_profile(measured_8b(), ref, small, H100)
    expected = roofline_profile(small, H100, "H100", "cuda:0")
    for (_n, t), (_, e) in zip(scaled.prefill, expected.prefill):
        assert t == pytest.approx(e, rel=1e-9)
    assert scaled.weight_bytes == small.weight_bytes and scaled.kv_bytes_per_token == small.kv_bytes_per_token


def test_time_beyond_the_roofline_scales_with_depth():
    ref, small = shape("llama-3.1-8b"), shape("llama-3.2-1b")  # 32 and 16 layers
    plain = scale_profile(measured_8b(), ref, small, H100)
    slow = scale_profile(measured_8b(overhead_s=0.040), ref, small, H100)
    for (_, a), (_, b) in zip(plain.prefill, slow.prefill):
        assert b - a == pytest.approx(0.020)  # half the layers: half the overhead


def test_tp_group_follows_amdahl_and_copies_faster():
    p = measured_8b()
    g = tp_profile(p, 4)
    f = TP_DECODE_PARALLEL_FRACTION
    assert g.decode[0][2] == pytest.approx(p.decode[0][2] * (f / 4 + 1 - f))
    assert g.h2d_bytes_per_s == pytest.approx(4 * p.h2d_bytes_per_s)
    assert tp_profile(p, 1) is p


def test_mixed_step_is_one_forward_pass_plus_the_decodes_kv_reads():
    cost = ProfileCostModel({"m": measured_8b()}, H100)
    decode_only = step_seconds(cost, "m", 8, 8000, 0)
    prefill_only = step_seconds(cost, "m", 0, 0, 512)
    mixed = step_seconds(cost, "m", 8, 8000, 512)
    assert decode_only == cost.decode_step_time("m", 8, 8000)
    assert prefill_only == cost.prefill_time("m", 512)
    assert max(decode_only, prefill_only) < mixed < decode_only + prefill_only
    assert step_seconds(cost, "m", 0, 0, 0) == 0.0


def test_profile_set_prefers_measured_then_nearest_then_roofline(tmp_path):
    p = measured_8b(overhead_s=0.01)
    ModelProfile.save(p, tmp_path / "a.json")
    profiles = ProfileSet.load(tmp_path)
    assert profiles.profile_for(shape("llama-3.1-8b"), "cuda:0")[1] == "measured"
    assert profiles.profile_for(shape("llama-3.2-3b"), "cuda:0")[1] == "scaled from llama-3.1-8b:random"
    assert ProfileSet.load(None).profile_for(shape("llama-3.2-3b"), "cuda:0")[1] == "roofline"
    with pytest.raises(ValueError, match="not found"):
        ProfileSet.load(tmp_path / "missing")


def test_measured_mixed_steps_replace_the_one_pass_rule():
    base = measured_8b()
    slow = dataclasses.replace(base, mixed=[(512, b, 1024, 0.2 + 0.01 * b) for b in (4, 16, 64)])
    cost = ProfileCostModel({"m": slow}, H100)
    assert cost.mixed_step_time("m", 16, 16 * 1024, 512) == pytest.approx(0.2 + 0.01 * 16, rel=0.05)
    assert step_seconds(cost, "m", 16, 16 * 1024, 512) == cost.mixed_step_time("m", 16, 16 * 1024, 512)
    assert ProfileCostModel({"m": base}, H100).mixed_step_time("m", 16, 1024, 512) is None
    again = ModelProfile.from_dict(slow.to_dict())
    assert again.mixed == slow.mixed  # kept in the profile file
    scaled = scale_profile(slow, shape("llama-3.1-8b"), shape("llama-3.2-1b"), H100)
    assert len(scaled.mixed) == 3 and all(t < t0 for (*_, t), (*_, t0) in zip(scaled.mixed, slow.mixed))


def test_host_overheads_per_sequence_round_trip_and_slow_a_batch_down(tmp_path):
    """host.yaml's per-sequence term is read back, and a simulated step pays it once per
    sequence: a batch of 8 decodes loses 8 x seq_s per token, one request alone 1 x."""
    import statistics

    from prism.bench.trace import TraceRequest
    from prism.sim.costs import HostOverheads
    from prism.sim.run import config_for, simulate

    host = HostOverheads(step_s=0.4e-3, request_s=0.02, seq_s=50e-6, cold_shape_s=0.012)
    host.save(tmp_path / "host.yaml")
    assert HostOverheads.load(tmp_path / "host.yaml") == host
    assert host.step_time(8) == pytest.approx(0.4e-3 + 8 * 50e-6)

    raw = {"devices": [{"device": "cuda:0", "memory": "24GiB"}],
           "models": [{"name": "m", "source": "llama-3.2-1b:random"}]}
    together = [TraceRequest(0.0, "m", 64, 200) for _ in range(8)]

    def tpot(seq_s):
        profiles = ProfileSet({}, {}, HostOverheads(seq_s=seq_s))
        return statistics.median(r.tpot for r in simulate(config_for(raw, "prism"), together, profiles).records)

    assert tpot(1e-3) - tpot(0.0) == pytest.approx(8e-3, rel=0.05)


def test_cold_shapes_charge_the_first_eager_step_of_each_class_once():
    """Token-count classes are powers of two; decodes (CUDA graphs) never pay; another shape
    has classes of its own."""
    from prism.sim.costs import ColdShapes, token_class

    assert [token_class(n) for n in (1, 2, 3, 4, 5, 8, 9, 64, 65, 128, 129)] == [0, 1, 2, 2, 3, 3, 4, 6, 7, 7, 8]
    cold = ColdShapes(0.01)
    assert cold.charge("a", (0, 0, 100)) == 0.01
    assert cold.charge("a", (0, 0, 120)) == 0.0  # 65-128 again
    assert cold.charge("a", (8, 900, 0)) == 0.0  # a decode step
    assert cold.charge("a", (3, 300, 60)) == 0.01  # a mixed step: 63 tokens with its decodes, 33-64
    assert cold.charge("a", (0, 0, 40)) == 0.0  # 33-64 again
    assert cold.charge("a", (0, 0, 200)) == 0.01
    assert cold.charge("b", (0, 0, 100)) == 0.01


def test_a_fresh_simulated_device_pays_each_shape_class_once():
    """Requests alone, far apart: the first prefill of a class costs cold_shape_s more; a
    second model of the same shape on the device finds its kernels loaded."""
    from prism.bench.trace import TraceRequest
    from prism.sim.costs import HostOverheads
    from prism.sim.run import config_for, simulate

    raw = {"devices": [{"device": "cuda:0", "memory": "24GiB"}],
           "models": [{"name": "a", "source": "llama-3.2-1b:random"},
                      {"name": "b", "source": "llama-3.2-1b:random:1"}]}
    trace = [TraceRequest(1.0, "a", 300, 4), TraceRequest(3.0, "a", 300, 4), TraceRequest(5.0, "b", 300, 4),
             TraceRequest(7.0, "a", 1000, 4)]

    def ttfts(cold_s):
        profiles = ProfileSet({}, {}, HostOverheads(cold_shape_s=cold_s))
        records = sorted(simulate(config_for(raw, "static"), trace, profiles).records, key=lambda r: r.index)
        return [r.ttft for r in records]

    warm, cold = ttfts(0.0), ttfts(0.05)
    assert [c - w for c, w in zip(cold, warm)] == pytest.approx([0.05, 0.0, 0.0, 0.05], abs=1e-9)


def test_the_launch_model_round_trips_and_a_file_without_it_is_unchanged(tmp_path):
    from prism.sim.costs import HostOverheads

    host = HostOverheads(step_s=0.2e-3, one_host_thread=True, launch_s=0.6e-3, launch_seq_s=15e-6,
                         launch_prefill_layer_s=120e-6, launch_eager_layer_s=230e-6)
    host.save(tmp_path / "host.yaml")
    assert HostOverheads.load(tmp_path / "host.yaml") == host
    plain = HostOverheads(step_s=0.2e-3)
    plain.save(tmp_path / "plain.yaml")
    assert "launch" not in (tmp_path / "plain.yaml").read_text()
    assert HostOverheads.load(tmp_path / "plain.yaml") == plain
    # eager beyond the cap, piecewise graphs up to it, decodes pay neither
    assert host.launch_time(2, 300, 298, 32, 256) == pytest.approx(0.6e-3 + 30e-6 + 32 * 350e-6)
    assert host.launch_time(2, 256, 254, 32, 256) == pytest.approx(0.6e-3 + 30e-6 + 32 * 120e-6)
    assert host.launch_time(2, 2, 0, 32, 256) == pytest.approx(0.6e-3 + 30e-6)
