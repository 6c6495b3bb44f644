"""Several models' steps in one turn (LocalSchedulerConfig.concurrent_models): the simulator
charges the turn as steps sharing the chip (ConcurrentTurn), the real worker steps the models
side by side and computes the same tokens as one model per step."""
import dataclasses

import pytest

from prism.sched.clock import ManualClock
from prism.sim.costs import ConcurrentTurn, card_defaults, step_floor, step_seconds
from prism.sim.device import SimDevice
from prism.sim.shapes import model_shape
from prism.types import SamplingParams
from prism.worker.device_worker import DeviceWorker

from linear_cost import LinearCost
from test_device_agrees_with_worker import config

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def test_a_turn_takes_the_longest_step_or_the_sum_of_the_floors():
    turn = ConcurrentTurn(card_defaults("cuda:0"))
    assert turn.charge(0.004, 0.003) == 0.004  # alone: its own time
    assert turn.charge(0.002, 0.0025) == pytest.approx(0.001)  # floors 0.003 + 0.002 (at most its time) > 0.004
    assert turn.charge(0.010, 0.0) == pytest.approx(0.005)  # longest 0.010 now
    assert turn.charged == pytest.approx(0.010)
    turn.reset()
    assert turn.charge(0.001, 0.0005) == 0.001


def test_a_group_of_gpus_has_their_rates_together():
    one, four = card_defaults("cuda:0"), ConcurrentTurn(card_defaults("cuda:0"), gpus=4)
    assert four.rates.memory_bytes_per_s == 4 * one.memory_bytes_per_s
    assert four.floor(140 << 30, 0, 0, 1).binding == pytest.approx(ConcurrentTurn(one).floor(140 << 30, 0, 0, 1).binding / 4)


def concurrent(cfg, n: int):
    return dataclasses.replace(cfg, scheduler=dataclasses.replace(cfg.scheduler, concurrent_models=n))


MODELS = ("m1", "m2")  # resident from the start in this config (m0 is not)


def two_models_decoding(device) -> None:
    assert set(MODELS) <= set(device.resident_models())
    for model in MODELS:
        for i in range(3):
            device.add_request(model, [5 + i] * 20, GREEDY, req_id=f"{model}-{i}")


def test_the_simulated_turn_is_charged_as_steps_side_by_side():
    cost, cfg = LinearCost(), concurrent(config("prism"), 2)
    shapes = {m.name: model_shape(m, "cpu") for m in cfg.models}
    sim = SimDevice(cfg, shapes, truth=cost, policy_profiles={}, policy_cost=cost)
    two_models_decoding(sim)
    sim.step()  # both prefills
    before = sim.clock.now()
    out = sim.step()
    plans = {m: sim.engines[m].last_plan for m in MODELS}
    assert out.num_tokens == sum(p.num_tokens for p in plans.values()) == 6  # both models decoded
    alone = [step_seconds(cost, m, *p.cost_terms()) for m, p in plans.items()]
    floors = [step_floor(card_defaults("cpu"), shapes[m].weight_bytes, shapes[m].kv_bytes_per_token,
                         p.cost_terms()[1], p.num_tokens) for m, p in plans.items()]
    assert sim.clock.now() - before == pytest.approx(max(max(alone), sum(floors)))
    assert sim.clock.now() - before < sum(alone)


def test_one_model_per_step_is_charged_as_before():
    cost, cfg = LinearCost(), config("prism")
    sim = SimDevice(cfg, {m.name: model_shape(m, "cpu") for m in cfg.models}, truth=cost,
                    policy_profiles={}, policy_cost=cost)
    assert sim.turn is None
    two_models_decoding(sim)
    before = sim.clock.now()
    sim.step()
    ran = [m for m in MODELS if sim.engines[m].last_plan is not None and not sim.engines[m].last_plan.is_empty]
    assert len(ran) == 1
    assert sim.clock.now() - before == pytest.approx(step_seconds(cost, ran[0], *sim.engines[ran[0]].last_plan.cost_terms()))


def run_worker(n: int) -> dict:
    worker = DeviceWorker(concurrent(config("prism"), n), clock=ManualClock(), cost=LinearCost())
    try:
        two_models_decoding(worker)
        both = 0
        outputs = {}
        while worker.has_unfinished:
            out = worker.step()
            planned = [m for m in MODELS if (p := worker.engines[m].last_plan) is not None and p.num_tokens]
            both += len(planned) == 2 and out.num_tokens == sum(worker.engines[m].last_plan.num_tokens for m in planned)
            outputs.update((o.req_id, o.token_ids) for _, o in out.finished)
            worker.clock.advance(0.001)
        return {"outputs": outputs, "turns_with_both": both}
    finally:
        worker.close()


def test_the_worker_steps_models_side_by_side_with_the_same_tokens():
    one, two = run_worker(1), run_worker(2)
    assert len(one["outputs"]) == 6 and two["outputs"] == one["outputs"]
    assert two["turns_with_both"] >= 5  # both models decoded in the same turn


@pytest.mark.parametrize("system", ["prism", "static", "muxserve", "serverless", "swap"])
def test_every_system_gets_the_device_mechanism(system):
    from prism.cluster.config import parse_config
    from prism.cluster.systems import system_config

    raw = {"devices": [{"device": "cpu", "memory": "1GiB"}], "models": [{"name": "a", "source": "tiny-llama:random"}],
           "scheduler": {"concurrent_models": 3}}
    assert parse_config(system_config(raw, system)).local.concurrent_models == 3


def test_steps_side_by_side_do_not_calibrate_the_estimates():
    """A side step's wall time is not its model's step time (the chip is shared, turns read
    each other's tokens): with concurrent_models > 1 the estimates keep their profiles."""
    from prism.sched.clock import MonotonicClock

    for n, calibrated in ((1, True), (2, False)):
        worker = DeviceWorker(concurrent(config("prism"), n), clock=MonotonicClock(), cost=LinearCost())
        try:
            two_models_decoding(worker)
            worker.run_until_idle()
            assert bool(worker.cost.factor) is calibrated
        finally:
            worker.close()
