"""Continuous batching, chunked prefill and preemption give the same tokens as one at a time."""
import random

import pytest
import torch

from prism.config import DeviceConfig, EngineConfig
from prism.engine.llm_engine import LLMEngine
from prism.types import RequestError, SamplingParams

PAGE = 64 << 10


def engine_for(folder, memory_bytes=64 << 20, device="cpu", **engine_kw):
    kw = dict(block_size=8, max_num_batched_tokens=48, max_num_seqs=64)
    kw.update(engine_kw)
    page = 2 << 20 if device.startswith("cuda") else PAGE  # CUDA's granularity is 2 MiB
    return LLMEngine(folder, EngineConfig(**kw), DeviceConfig(device, memory_bytes, page),
                     dtype=torch.float32)


def mixed_requests(n: int, seed: int = 0, max_prompt: int = 70, max_output: int = 24):
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, 320) for _ in range(rng.randint(1, max_prompt))] for _ in range(n)]
    params = [SamplingParams(temperature=0, max_tokens=rng.randint(1, max_output), ignore_eos=True)
              for _ in range(n)]
    return prompts, params


@pytest.fixture
def folder(tiny_checkpoint):
    # A larger init scale spreads the logits so greedy choices are not near-ties that
    # floating-point reassociation between batch shapes could flip.
    folder, _ = tiny_checkpoint("LlamaForCausalLM", initializer_range=0.3)
    return folder


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda:0", marks=pytest.mark.gpu)])
def test_32_concurrent_requests_match_one_at_a_time(folder, device):
    prompts, params = mixed_requests(32)
    engine = engine_for(folder, device=device)
    try:
        alone = [engine.generate([p], sp)[0].token_ids for p, sp in zip(prompts, params)]
        together = engine.generate(prompts, params)
    finally:
        engine.close()
    assert [o.token_ids for o in together] == alone
    assert all(len(o.token_ids) == sp.max_tokens for o, sp in zip(together, params))


def test_generate_drops_token_events_as_it_goes(folder):
    """Nobody streams generate()'s events: they must not pile up over a long batch (kept,
    they would reach the old generation that every full garbage collection walks)."""
    prompts, params = mixed_requests(32, seed=4)
    engine = engine_for(folder)
    pending_events = []
    step = engine.step

    def watched_step(*args, **kwargs):
        pending_events.append(len(engine._events))
        return step(*args, **kwargs)

    engine.step = watched_step
    try:
        outputs = engine.generate(prompts, params)
    finally:
        engine.close()
    assert sum(len(o.token_ids) for o in outputs) > 10 * len(prompts) > max(pending_events)
    assert pending_events[0] == 0 and len(pending_events) > 10


def test_burst_beyond_memory_preempts_and_loses_nothing(folder):
    # Short prompts are all admitted at once; their long outputs then outgrow the memory.
    prompts, params = mixed_requests(32, seed=1, max_prompt=30, max_output=80)
    roomy = engine_for(folder)
    try:
        expected = [o.token_ids for o in roomy.generate(prompts, params)]
    finally:
        roomy.close()
    # Weights take a few pages; leave one KV page (64 blocks of 8 tokens) for 32 requests.
    tight = engine_for(folder, memory_bytes=roomy.weights.num_pages * PAGE + 1 * 2 * 2 * PAGE)
    try:
        outs = tight.generate(prompts, params)
        assert tight.num_preemptions > 0
        assert tight.kv.num_mapped_pages <= 1
    finally:
        tight.close()
    assert [o.token_ids for o in outs] == expected
    assert tight.pool.used_pages == 0


def test_bad_requests_are_refused_and_the_engine_keeps_running(folder):
    engine = engine_for(folder)
    try:
        used = engine.pool.used_pages
        with pytest.raises(RequestError, match="context limit"):
            engine.add_request(list(range(3, 3 + 300)))
        with pytest.raises(RequestError, match="outside the vocabulary"):
            engine.add_request([5, 99999])
        with pytest.raises(RequestError, match="empty"):
            engine.add_request([])
        with pytest.raises(RequestError, match="no tokenizer"):
            engine.add_request("text needs a tokenizer")
        with pytest.raises(RequestError, match="max_tokens"):
            SamplingParams(max_tokens=0)
        assert engine.pool.used_pages == used
        out = engine.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
        assert len(out[0].token_ids) == 4
    finally:
        engine.close()
    assert engine.pool.used_pages == 0


def test_abort_and_close_return_every_page(folder):
    engine = engine_for(folder)
    weight_pages = engine.weights.num_pages
    prompts, params = mixed_requests(8, seed=2)
    ids = [engine.add_request(p, sp) for p, sp in zip(prompts, params)]
    engine.step()
    assert engine.pool.used_pages > weight_pages
    for req_id in ids:
        engine.abort(req_id)
    assert engine.blocks.num_mapped_pages <= engine.blocks.num_spare_pages
    engine.close()
    assert engine.pool.used_pages == 0


def test_seeded_sampling_is_reproducible(folder):
    engine = engine_for(folder)
    try:
        sp = SamplingParams(temperature=1.0, top_p=0.9, seed=7, max_tokens=10, ignore_eos=True)
        a = engine.generate([[4, 5, 6]], sp)[0].token_ids
        b = engine.generate([[4, 5, 6], [7, 8]], [sp, sp])[0].token_ids
    finally:
        engine.close()
    assert a == b


def test_corrupt_model_loaded_beside_a_running_engine_leaks_no_pages(folder, tmp_path):
    import shutil

    running = engine_for(folder)
    try:
        req = running.add_request([5, 6, 7], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
        running.step()
        used = running.pool.used_pages
        broken = tmp_path / "broken"
        shutil.copytree(folder, broken)
        weights = next(broken.glob("*.safetensors"))
        weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
        with pytest.raises(ValueError, match="safetensors"):
            LLMEngine(str(broken), pool=running.pool, model_id="broken", dtype=torch.float32)
        assert running.pool.used_pages == used
        done = []
        while running.has_unfinished:
            done += running.step()
        assert [o.req_id for o in done] == [req] and len(done[0].token_ids) == 6
    finally:
        running.close()


def _compiled_variants(kernel) -> int:
    return sum(len(caches[0]) for caches in kernel.device_caches.values())


@pytest.mark.gpu
def test_serving_compiles_no_kernel_after_start(folder):
    """A Triton compile mid-serving stalls every model of the device for about a second: the
    engine compiles its eager kernels at start, and batches of any shape reuse them."""
    from prism.kernels.decode_attention import _decode_split_kernel
    from prism.kernels.prefill_attention import _prefill_kernel

    engine = engine_for(folder, device="cuda:0", kernels="triton", max_num_batched_tokens=256)
    try:
        before = _compiled_variants(_prefill_kernel), _compiled_variants(_decode_split_kernel)
        # Block tables 1 to 22 blocks wide (stride 1, multiples of 16 and others), mixed steps.
        prompts, params = mixed_requests(48, seed=3, max_prompt=170, max_output=8)
        engine.generate(prompts, params)
        after = _compiled_variants(_prefill_kernel), _compiled_variants(_decode_split_kernel)
    finally:
        engine.close()
    assert after == before


def test_eager_steps_padded_to_a_row_multiple_give_the_same_tokens(folder):
    """Once every GEMM shape was launched at start (CUDA does it), eager steps with prefill
    pad their rows to a multiple of 32: padding rows store no KV and change no token."""
    prompts, params = mixed_requests(24, seed=7)
    engine = engine_for(folder)
    rows = []
    forward = engine.runner.model.forward
    engine.runner.model.forward = lambda ids, pos, meta, kv: (rows.append((len(ids), meta.max_query_len > 1)),
                                                               forward(ids, pos, meta, kv))[1]
    try:
        plain = engine.generate(prompts, params)
        assert any(n % 32 for n, _ in rows)
        engine.runner.launch_every_gemm(engine.scheduler.config.max_num_seqs, 48)
        assert engine.runner.eager_row_multiple == 32
        rows.clear()
        padded = engine.generate(prompts, params)
    finally:
        engine.close()
    assert all(n % 32 == 0 for n, prefill in rows if prefill) and any(prefill for _, prefill in rows)
    assert [o.token_ids for o in padded] == [o.token_ids for o in plain]


def test_the_warm_up_steps_leave_the_engine_as_it_was(folder):
    """The start-up warm-up (run on CUDA: prefill, the decode of its pending tokens, an eager
    prefill) gives back its blocks and pages and changes no request's tokens."""
    prompts, params = mixed_requests(12, seed=5)
    plain, warmed = engine_for(folder), engine_for(folder)
    try:
        pages = warmed.pool.pages_of(warmed.kv.owner)
        warmed.executor._warm_up_eager_kernels(48)
        assert warmed.pool.pages_of(warmed.kv.owner) == pages
        outputs = [e.generate(prompts, params) for e in (plain, warmed)]
    finally:
        plain.close()
        warmed.close()
    assert [o.token_ids for o in outputs[1]] == [o.token_ids for o in outputs[0]]


def test_kv_pages_are_mapped_while_the_step_runs_not_when_the_next_is_planned(folder):
    """Growing sequences map their next pages during the previous step (map_ahead), so after
    the first step the scheduler finds its blocks mapped already."""
    engine = engine_for(folder, block_size=4, max_num_batched_tokens=256)
    mapped_while_planning = []
    inner_map, inner_schedule = engine.kv.map_page, engine.scheduler.schedule
    planning = [False]

    def map_page(page):
        if planning[0]:
            mapped_while_planning.append(page)
        return inner_map(page)

    def schedule(*args):
        planning[0] = True
        try:
            return inner_schedule(*args)
        finally:
            planning[0] = False

    engine.blocks.mapper.map_page = map_page
    engine.scheduler.schedule = schedule
    try:
        engine.add_request([7] * 10, SamplingParams(temperature=0, max_tokens=200, ignore_eos=True))
        engine.step()  # the prefill maps its pages when planned: nothing could be ahead
        first = len(mapped_while_planning)
        while engine.has_unfinished:
            engine.step()
    finally:
        engine.close()
    assert first >= 1 and len(mapped_while_planning) == first


def test_sampling_features_through_the_engine(tiny_checkpoint):
    """Logprobs come out of the real engine, one per token, matching transformers' log-softmax
    of the same weights; logit_bias and penalties steer greedy rows; batching changes nothing."""
    folder, hf_model = tiny_checkpoint("LlamaForCausalLM", initializer_range=0.3)
    prompts, _ = mixed_requests(6, seed=3, max_output=1)
    params = [
        SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3),
        SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logit_bias={7: 100.0}),
        SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, frequency_penalty=2.0, presence_penalty=2.0),
        SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, repetition_penalty=3.0, logprobs=0),
        SamplingParams(temperature=0.8, seed=4, max_tokens=6, ignore_eos=True, min_p=0.2, logprobs=2),
        SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
    ]
    engine = engine_for(folder)
    try:
        together = engine.generate(prompts, params)
        alone = [engine.generate([p], sp)[0] for p, sp in zip(prompts, params)]
    finally:
        engine.close()
    assert [o.token_ids for o in together] == [o.token_ids for o in alone]
    first = together[0]
    assert len(first.logprobs) == 6 and all(len(lp.top) == 3 for lp in first.logprobs)
    for token, lp in zip(first.token_ids, first.logprobs):  # greedy: the chosen token tops the list
        assert lp.top[0][0] == token and lp.top[0][1] == pytest.approx(lp.logprob)
        assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)
    with torch.no_grad():
        ref = torch.log_softmax(hf_model(torch.tensor([prompts[0]])).logits[0, -1].double(), -1)
    assert [t for t, _ in first.logprobs[0].top] == ref.topk(3).indices.tolist()
    assert [v for _, v in first.logprobs[0].top] == pytest.approx(ref.topk(3).values.tolist(), abs=1e-4)
    assert together[1].token_ids == [7] * 6
    assert len(set(together[2].token_ids)) == 6  # penalised: no token twice
    assert together[3].logprobs and all(lp.top == [] for lp in together[3].logprobs)
    assert together[4].token_ids == alone[4].token_ids and len(together[4].logprobs) == 6
    assert together[5].logprobs is None


def test_logit_bias_outside_the_vocabulary_is_rejected(folder):
    engine = engine_for(folder)
    try:
        with pytest.raises(RequestError, match="logit_bias"):
            engine.add_request([5, 6], SamplingParams(logit_bias={320: 1.0}))
    finally:
        engine.close()
