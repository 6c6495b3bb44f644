"""Overlap (engine/core.py): step n+1 is launched before step n's tokens are read. Every
result must equal the engine's without overlap: tokens, finish reasons, logprobs, with stop
tokens, length limits, seeded sampling, preemption, aborts and eviction in between."""
import random

import pytest

from prism.engine.sequence import PENDING
from prism.types import FinishReason, SamplingParams

from test_batching import PAGE, engine_for, mixed_requests


@pytest.fixture
def folder(tiny_checkpoint):
    folder, _ = tiny_checkpoint("LlamaForCausalLM", initializer_range=0.3)
    return folder


def run(folder, prompts, params, overlap: bool, **engine_kw):
    """(outputs in request order, launches that went out with a step in flight)."""
    engine = engine_for(folder, overlap=overlap, **engine_kw)
    launches_behind = [0]
    launch = engine.executor.launch

    def counting_launch(plan, after):
        launches_behind[0] += after is not None
        return launch(plan, after)

    engine.executor.launch = counting_launch
    try:
        outputs = engine.generate(prompts, params)
        preemptions = engine.num_preemptions
    finally:
        engine.close()
    return outputs, launches_behind[0], preemptions


def assert_same_outputs(a, b) -> None:
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    assert [o.finish_reason for o in a] == [o.finish_reason for o in b]
    assert all(PENDING not in o.token_ids for o in a)


def test_greedy_seeded_stops_and_lengths_equal_the_plain_engine(folder):
    prompts, _ = mixed_requests(24, seed=5, max_output=30)
    rng = random.Random(5)
    params = [SamplingParams(temperature=0, max_tokens=rng.randint(1, 30), ignore_eos=True) for _ in prompts]
    free, _, _ = run(folder, prompts, params, overlap=False)
    # Stop on a token each request really produces (mid-output), so stops end requests early.
    params = [
        SamplingParams(temperature=[0, 1.0][i % 2], seed=100 + i, max_tokens=p.max_tokens + 5, ignore_eos=True,
                       stop_token_ids=[o.token_ids[len(o.token_ids) // 2]], logprobs=2 if i % 3 == 0 else None)
        for i, (p, o) in enumerate(zip(params, free))
    ]
    plain, behind_plain, _ = run(folder, prompts, params, overlap=False)
    overlapped, behind, _ = run(folder, prompts, params, overlap=True)
    assert_same_outputs(overlapped, plain)
    # Batches differ by the rows of requests that just ended, so floats may differ in the last bits.
    for a, b in zip(overlapped, plain):
        assert (a.logprobs is None) == (b.logprobs is None)
        for x, y in zip(a.logprobs or [], b.logprobs or []):
            assert x.logprob == pytest.approx(y.logprob, abs=1e-4)
            assert [t for t, _ in x.top] == [t for t, _ in y.top]
    assert {o.finish_reason for o in plain} == {FinishReason.STOP, FinishReason.LENGTH}
    assert behind_plain == 0 and behind > 10  # the steps really went out behind each other


def test_preemption_under_memory_pressure_equals_the_plain_engine(folder):
    prompts, params = mixed_requests(32, seed=1, max_prompt=30, max_output=80)
    roomy = engine_for(folder)
    weight_pages = roomy.weights.num_pages
    roomy.close()
    tight = dict(memory_bytes=weight_pages * PAGE + 4 * PAGE)
    plain, _, preempted_plain = run(folder, prompts, params, overlap=False, **tight)
    overlapped, behind, preempted = run(folder, prompts, params, overlap=True, **tight)
    assert_same_outputs(overlapped, plain)
    assert preempted_plain > 0 and preempted > 0 and behind > 0


def test_penalties_and_mixed_lengths_equal_the_plain_engine(folder):
    """Rows with penalties need their last token on the host: those steps wait, others not."""
    prompts, _ = mixed_requests(12, seed=7, max_output=20)
    params = [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True,
                             frequency_penalty=1.5 if i % 4 == 0 else 0.0) for i in range(len(prompts))]
    plain, _, _ = run(folder, prompts, params, overlap=False)
    overlapped, _, _ = run(folder, prompts, params, overlap=True)
    assert_same_outputs(overlapped, plain)


def step_until_done(engine, finished: dict) -> None:
    while engine.has_unfinished:
        for out in engine.step():
            finished[out.req_id] = out


def test_abort_while_the_step_is_in_flight(folder):
    prompts, params = mixed_requests(6, seed=2, max_output=40)
    params = [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True) for _ in prompts]
    expected, _, _ = run(folder, prompts, params, overlap=False)
    engine = engine_for(folder, overlap=True)
    try:
        ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
        for _ in range(6):
            engine.step()
        assert engine.has_in_flight and engine.sequence(ids[0]).num_pending == 1
        aborted = engine.abort(ids[0])
        finished = {}
        step_until_done(engine, finished)
    finally:
        engine.close()
    assert aborted.finish_reason is FinishReason.ABORT and PENDING not in aborted.token_ids
    assert aborted.token_ids == expected[0].token_ids[: len(aborted.token_ids)]
    assert [finished[i].token_ids for i in ids[1:]] == [o.token_ids for o in expected[1:]]


def test_eviction_with_a_step_in_flight_loses_no_request(folder):
    """Evicting reads the step in flight first: requests it ends come out of the next step();
    the others are recomputed after activation and end as if nothing happened."""
    prompts, _ = mixed_requests(8, seed=4, max_output=20)
    params = [SamplingParams(temperature=0, max_tokens=3 + 4 * i, ignore_eos=True) for i in range(len(prompts))]
    expected, _, _ = run(folder, prompts, params, overlap=False)
    engine = engine_for(folder, overlap=True)
    try:
        ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
        finished = {}
        for _ in range(5):
            finished.update((o.req_id, o) for o in engine.step())
        assert engine.has_in_flight
        engine.evict()
        assert not engine.has_in_flight and engine.has_unfinished
        engine.activate()
        step_until_done(engine, finished)
    finally:
        engine.close()
    assert [finished[i].token_ids for i in ids] == [o.token_ids for o in expected]


@pytest.mark.gpu
def test_on_cuda_the_launch_never_waits_for_the_device(folder):
    """Same tokens as the plain engine on the GPU (graphs and eager steps), and no launch
    makes the host wait for the device: torch's sync debug mode raises on any copy or call
    that synchronizes."""
    import torch

    prompts, _ = mixed_requests(24, seed=9, max_output=30)
    params = [SamplingParams(temperature=[0, 1.0][i % 2], seed=i, max_tokens=5 + i, ignore_eos=True,
                             logprobs=1 if i % 5 == 0 else None) for i in range(len(prompts))]
    plain, _, _ = run(folder, prompts, params, overlap=False, device="cuda:0")
    engine = engine_for(folder, overlap=True, device="cuda:0")
    launch = engine.executor.launch

    def strict_launch(plan, after):
        torch.cuda.set_sync_debug_mode("error")
        try:
            return launch(plan, after)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    engine.executor.launch = strict_launch
    try:
        overlapped = engine.generate(prompts, params)
    finally:
        engine.close()
    assert_same_outputs(overlapped, plain)


@pytest.mark.gpu
def test_on_cuda_a_page_freed_behind_queued_work_is_unmapped_later_without_waiting(folder):
    """A request that finishes while the next step is queued frees KV pages that step may
    still write: their unmap waits until the device has passed it, without the host waiting."""
    import time

    import torch

    engine = engine_for(folder, device="cuda:0")
    kv, pool, backend = engine.kv, engine.pool, engine.pool.backend
    waits = []
    synchronize = backend.synchronize
    backend.synchronize = lambda: (waits.append(1), synchronize())
    per_page = kv.pages_per_kv_page
    try:
        page = kv.layout.num_virtual_pages - 1  # one the block manager does not hold
        before, mapped = pool.pages_of(kv.owner), kv.num_mapped_pages
        assert kv.map_page(page) and pool.pages_of(kv.owner) == before + per_page
        torch.cuda._sleep(1 << 30)  # about half a second of queued work on the model's stream
        t0 = time.perf_counter()
        kv.unmap_page(page)
        assert time.perf_counter() - t0 < 0.05 and not waits
        assert kv.num_mapped_pages == mapped and pool.pages_of(kv.owner) == before + per_page
        assert kv.num_mappable_pages() >= 1  # the deferred page counts as room
        assert kv.map_page(page) and pool.pages_of(kv.owner) == before + per_page  # kept, not remapped
        kv.unmap_page(page)
        kv.reclaim()  # the device has not passed the event yet
        assert pool.pages_of(kv.owner) == before + per_page
        torch.cuda.synchronize()
        kv.reclaim()
        assert pool.pages_of(kv.owner) == before and kv.num_mapped_pages == mapped
        assert kv.map_page(page)
        kv.unmap_page(page)  # nothing queued: unmapped at once
        assert pool.pages_of(kv.owner) == before and not waits
        outputs = engine.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4))
        assert len(outputs[0].token_ids) == 4
    finally:
        engine.close()


@pytest.mark.gpu
def test_on_cuda_no_launch_waits_for_the_work_queued_before_it(folder):
    """A kernel's first launch in the process waits for everything queued on the device
    (cuBLAS picks its GEMM kernel by the row count), which sync debug mode does not see.
    Before every launch 100 ms of work is queued: steps of rows never seen before, eager
    ones among them (steps up to 512 tokens, graphs only up to 256), launch in well under."""
    import time

    import torch

    prompts, params = mixed_requests(40, seed=11, max_prompt=250, max_output=6)  # context limit 256
    engine = engine_for(folder, overlap=True, device="cuda:0", kernels="triton", max_num_batched_tokens=512)
    launch, held = engine.executor.launch, []
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    torch.cuda._sleep(10**7)  # a kernel that spins for this many cycles
    torch.cuda.synchronize()
    cycles = int(10**7 * 0.1 / (time.perf_counter() - t0))  # ~100 ms

    def timed_launch(plan, after):
        torch.cuda._sleep(cycles)
        t0 = time.perf_counter()
        try:
            return launch(plan, after)
        finally:
            held.append((time.perf_counter() - t0, plan.num_tokens))

    engine.executor.launch = timed_launch
    try:
        engine.generate(prompts, params)
    finally:
        engine.close()
    assert any(n > 256 for _, n in held)
    assert max(s for s, _ in held) < 0.05, sorted(held, reverse=True)[:5]
