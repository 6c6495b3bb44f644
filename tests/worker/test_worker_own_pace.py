"""Models stepping at their own pace on a real device worker (LocalSchedulerConfig.pace "own"):
every model whose last step is over steps again, none waits for another's step, and each
computes the tokens it computes alone. On the CPU steps are synchronous (always over); on CUDA
each model has a stream of its own and a small model's steps complete while a big one's run."""
import dataclasses

import msgspec
import pytest

from prism.config import DeviceConfig, EngineConfig, ModelSpec
from prism.sched.clock import ManualClock
from prism.sched.local import LocalSchedulerConfig, Pace
from prism.types import SamplingParams
from prism.worker.device_worker import DeviceWorker, WorkerConfig

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
ENGINE = EngineConfig(block_size=8, max_num_batched_tokens=96, max_num_seqs=8)  # overlap on


def cpu_config(pace: Pace) -> WorkerConfig:
    models = (ModelSpec("a", "tiny-llama:random", engine=ENGINE), ModelSpec("b", "tiny-qwen2:random", engine=ENGINE))
    return WorkerConfig(DeviceConfig("cpu", 64 << 20, 256 << 10), models,
                        LocalSchedulerConfig(policy="rr", pace=pace), detokenize=False)


def serve(worker: DeviceWorker, requests: dict[str, list[tuple[list[int], SamplingParams]]]) -> dict:
    """Run `requests` (per model) to the end: {req_id: token ids}, and the steps in which every
    model with work stepped."""
    for model, reqs in requests.items():
        for i, (prompt, params) in enumerate(reqs):
            worker.add_request(model, prompt, params, req_id=f"{model}-{i}")
    outputs, all_stepped = {}, 0
    worker.record_launches = True
    while worker.has_unfinished:
        busy = [m for m, e in worker.engines.items() if e.has_unfinished]
        out = worker.step()
        launches = worker.take_launches()  # at its own pace only
        assert all(launch.took_s >= 0 and launch.seqs > 0 for launch in launches)
        all_stepped += len(busy) > 1 and sorted(launch.model_id for launch in launches) == sorted(busy)
        outputs.update((o.req_id, o.token_ids) for _, o in out.finished)
    return {"outputs": outputs, "all_stepped": all_stepped}


def requests(n: int = 3) -> dict:
    return {m: [([5 + i] * (10 + 7 * i), GREEDY) for i in range(n)] for m in ("a", "b")}


def test_the_engines_done_query_on_the_cpu_is_always_true():
    worker = DeviceWorker(cpu_config(Pace.OWN), clock=ManualClock())
    try:
        engine = worker.engines["a"]
        assert engine.in_flight_done  # nothing in flight
        worker.add_request("a", [5, 6, 7], GREEDY)
        worker.step()
        assert engine.has_in_flight and engine.in_flight_done  # launched with overlap, computed already
    finally:
        worker.close()


def test_at_their_own_pace_every_model_steps_and_computes_what_it_does_in_turn():
    results = {}
    for pace in Pace:
        worker = DeviceWorker(cpu_config(pace), clock=ManualClock())
        try:
            assert worker.own_pace is (pace is Pace.OWN)
            results[pace] = serve(worker, requests())
        finally:
            worker.close()
    own, turn = results[Pace.OWN], results[Pace.TURN]
    assert len(own["outputs"]) == 6 and own["outputs"] == turn["outputs"]
    assert own["all_stepped"] >= 10 and turn["all_stepped"] == 0  # in turn one model per step


def test_at_its_own_pace_a_model_reads_its_last_step_before_launching_the_next():
    """Its tokens go out before the next launch (an eager prefill's launch holds the host for
    milliseconds), and the scheduler sees them: with one seat, a request that just finished
    gives its seat to the next one in the same step, so no step launches nothing."""
    one_seat = dataclasses.replace(ENGINE, max_num_seqs=1)
    config = WorkerConfig(DeviceConfig("cpu", 64 << 20, 256 << 10), (ModelSpec("a", "tiny-llama:random", engine=one_seat),),
                          LocalSchedulerConfig(policy="rr", pace=Pace.OWN), detokenize=False)
    worker = DeviceWorker(config, clock=ManualClock())
    try:
        for i in range(3):
            worker.add_request("a", [5 + i] * 10, msgspec.structs.replace(GREEDY, max_tokens=4), req_id=f"r{i}")
        worker.record_launches = True
        calls = launches = 0
        while worker.has_unfinished:
            worker.step()
            calls, launches = calls + 1, launches + len(worker.take_launches())
    finally:
        worker.close()
    assert launches == 12 and calls == launches + 1  # the last call reads the last tokens


# ---- CUDA ----------------------------------------------------------------------------------------
BIG, SMALL = "llama-3.2-3b:random", "llama-3.2-1b:random"


def cuda_worker(sources: dict[str, str], pace: Pace) -> DeviceWorker:
    engine = EngineConfig(max_num_batched_tokens=2048, max_num_seqs=32, max_model_len=4096)
    models = tuple(ModelSpec(name, source, dtype="bfloat16", engine=engine) for name, source in sources.items())
    return DeviceWorker(WorkerConfig(DeviceConfig("cuda:0", 40 << 30), models,
                                     LocalSchedulerConfig(policy="rr", pace=pace), detokenize=False))


def cuda_requests(model: str) -> list[tuple[list[int], SamplingParams]]:
    if model == "big":  # long prefills (2,048-token steps), then a decode batch of 8
        return [([7 + i] * 1900, msgspec.structs.replace(GREEDY, max_tokens=16)) for i in range(8)]
    return [([9 + i] * 40, msgspec.structs.replace(GREEDY, max_tokens=64)) for i in range(2)]


@pytest.mark.gpu
def test_on_cuda_a_small_models_steps_complete_while_the_big_ones_run():
    sources = {"big": BIG, "small": SMALL}
    alone = {}
    for name, source in sources.items():
        worker = cuda_worker({name: source}, Pace.TURN)
        try:
            alone.update(serve(worker, {name: cuda_requests(name)})["outputs"])
        finally:
            worker.close()
    worker = cuda_worker(sources, Pace.OWN)
    try:
        big, small = worker.engines["big"], worker.engines["small"]
        for model in sources:
            for i, (prompt, params) in enumerate(cuda_requests(model)):
                worker.add_request(model, prompt, params, req_id=f"{model}-{i}")
        outputs, small_beside_big = {}, 0
        while worker.has_unfinished:
            big_running = big.has_in_flight and not big.in_flight_done
            before = small.last_plan
            out = worker.step()
            # small stepped (its last step read, the next launched) while big's step ran
            small_beside_big += big_running and small.last_plan is not before and not small.last_plan.is_empty
            outputs.update((o.req_id, o.token_ids) for _, o in out.finished)
    finally:
        worker.close()
    assert outputs == alone  # greedy: each model's tokens as alone
    print(f"\nsmall's steps while big's step was running: {small_beside_big}")
    assert small_beside_big >= 10
