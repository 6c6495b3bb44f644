"""The cases of benchmarks/engine.py beyond one step's time: the decode kernel's tile sweep,
activation, the elastic-memory overhead, two models on two CUDA streams, many models, mixed
steps as piecewise graphs (offline throughput: offline_case.py).

Each returns a dict for the JSON (phase, model, time_ms, and where there is one a ceiling
measured in the same run with its ratio).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict

import torch

from prism.engine.llm_engine import LLMEngine
from prism.engine.profiler import decode_plan, prefill_all, synchronize
from prism.engine.sequence import ScheduledChunk, Sequence, StepPlan
from prism.types import SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=1 << 20, ignore_eos=True)


def random_prompts(vocab: int, lengths: list[int], seed: int = 1) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


def prefilled(engine: LLMEngine, batch: int, context: int, extra_tokens: int = 0) -> list[Sequence]:
    """`batch` sequences with `context` tokens in the KV cache (prefilled for real) and room
    for `extra_tokens` more."""
    seqs = [Sequence(f"b{i}", ids, GREEDY) for i, ids in
            enumerate(random_prompts(engine.config.vocab_size, [context] * batch, seed=0))]
    for s in seqs:
        assert engine.blocks.allocate(s, context + extra_tokens), "not enough KV memory for the benchmark"
    prefill_all(engine, seqs, context)
    return seqs


def free(engine: LLMEngine, seqs: list[Sequence]) -> None:
    for s in seqs:
        engine.blocks.free(s)
        engine.runner.forget(s)


# ---- decode kernel sweep ---------------------------------------------------------------------
def decode_kernel_sweep(engine: LLMEngine, batch: int, context: int, bandwidth: float) -> dict:
    """Time the decode attention kernel of layer 0 over a real batch's KV for a grid of tile
    configurations, each checked against the reference attention; the fastest first."""
    import triton.testing

    from prism.engine.attention import paged_attention_reference, write_kv
    from prism.kernels import decode_attention as dk

    seqs = prefilled(engine, batch, context, extra_tokens=1)
    try:
        meta = engine.runner.prepare(decode_plan(seqs)).meta
        c = engine.config
        k_cache, v_cache = engine.kv.k_caches[0], engine.kv.v_caches[0]
        shape = (batch, c.num_kv_heads, c.head_dim)
        new_k, new_v = (torch.randn(shape, device=engine.device, dtype=engine.dtype) for _ in range(2))
        write_kv(k_cache, v_cache, new_k, new_v, meta)  # the new token's slot, as the model would
        q = torch.randn(batch, c.num_heads, c.head_dim, device=engine.device, dtype=engine.dtype)
        scale = c.head_dim ** -0.5
        expected = paged_attention_reference(q, k_cache, v_cache, meta, scale).float()
        kv_bytes = 2 * batch * context * c.num_kv_heads * c.head_dim * engine.dtype.itemsize
        rows = []
        for block_n in (32, 64, 128):
            for warps in (4, 8):
                for stages in (2, 3, 4):
                    cfg = dk.DecodeConfig(block_n, warps, stages)
                    run = lambda: dk.paged_decode_attention(q, k_cache, v_cache, meta, scale, config=cfg)  # noqa: E731, B023
                    try:
                        err = (run().float() - expected).abs().max().item()
                        ms = triton.testing.do_bench(run, warmup=10, rep=100)
                    except Exception as e:  # out of shared memory or registers
                        rows.append(dict(config=asdict(cfg), error=type(e).__name__))
                        continue
                    rows.append(dict(config=asdict(cfg), ms=ms, max_abs_err=err,
                                     roofline_ratio=ms / 1e3 / (kv_bytes / bandwidth)))
    finally:
        free(engine, seqs)
    rows.sort(key=lambda r: r.get("ms", float("inf")))
    return dict(phase="decode_kernel_sweep", model=engine.source.name, batch=batch, context=context,
                kv_bytes_layer=kv_bytes, roofline_ms=kv_bytes / bandwidth * 1e3, rows=rows)


# ---- activation --------------------------------------------------------------------------------
def activation_case(engine: LLMEngine, h2d_bandwidth: float, repeats: int = 3) -> dict:
    """Evict (unmap weights and KV) and activate again (map, copy the weights in from the
    pinned host copy); ceiling: weight bytes over the pinned host-to-device rate."""
    times = []
    for _ in range(repeats):
        engine.evict()
        synchronize(engine.device)
        t0 = time.perf_counter()
        engine.activate()  # synchronizes the device
        times.append(time.perf_counter() - t0)
    time_s = statistics.median(times)
    ceiling_s = engine.weights.num_bytes / h2d_bandwidth
    return dict(phase="activation", model=engine.source.name, batch=0, context=0, steps=repeats,
                time_ms=time_s * 1e3, roofline_ms=ceiling_s * 1e3, roofline_ratio=time_s / ceiling_s,
                weight_bytes=engine.weights.num_bytes, GBps=engine.weights.num_bytes / time_s / 1e9,
                all_ms=[t * 1e3 for t in times])


# ---- elastic memory overhead -----------------------------------------------------------------
def _served(engine: LLMEngine, prompts: list[list[int]], output_len: int, one_by_one: bool) -> dict:
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    if one_by_one:
        outs = [engine.generate([p], params)[0] for p in prompts]
    else:
        outs = engine.generate(prompts, params)
    return dict(ttft_ms=statistics.median(o.metrics["ttft"] for o in outs) * 1e3,
                tpot_ms=statistics.median(o.metrics["tpot"] for o in outs) * 1e3)


def elastic_overhead_case(engine: LLMEngine, alone: tuple[int, int, int] = (8, 1024, 64),
                          together: tuple[int, int, int] = (64, 512, 256)) -> list[dict]:
    """The same requests served with KV pages mapped on demand (and unmapped when free) and
    with every page the pool allows mapped up front: TTFT and TPOT medians, ratio elastic /
    static. Two loads of (requests, prompt, output) tokens: `alone`, one request at a time
    (each prefill maps its pages anew), and `together`, all at once (decodes map pages as they
    grow)."""
    vocab = engine.config.vocab_size
    loads = [("alone", random_prompts(vocab, [alone[1]] * alone[0], seed=2), alone[2], True),
             (f"batch{together[0]}", random_prompts(vocab, [together[1]] * together[0], seed=3), together[2], False)]
    _served(engine, loads[0][1][:2], 8, True)  # warm-up
    results = {}
    for mode in ("elastic", "static", "elastic again"):
        if mode == "static":
            engine.blocks.keep_mapped(engine.blocks.num_virtual_pages)
        else:
            engine.blocks.num_spare_pages = 1
            engine.blocks.release_all_free_pages()
        results[mode] = {name: _served(engine, prompts, out, alone) for name, prompts, out, alone in loads}
    engine.blocks.num_spare_pages = 1
    engine.blocks.release_all_free_pages()
    cases = []
    for name, *_ in loads:
        for metric in ("ttft_ms", "tpot_ms"):
            elastic = statistics.mean(results[m][name][metric] for m in ("elastic", "elastic again"))
            static = results["static"][name][metric]
            cases.append(dict(phase="elastic_overhead", model=engine.source.name, load=name, metric=metric,
                              time_ms=elastic, roofline_ms=static, roofline_ratio=elastic / static,
                              runs={m: results[m][name][metric] for m in results}))
    return cases


# ---- two models on two streams ---------------------------------------------------------------
def _decode_launch(engine: LLMEngine, seqs: list[Sequence]) -> torch.Tensor:
    """One decode step's forward (graph replay) and greedy pick, launched, not waited for."""
    hb = engine.runner.host_batch(decode_plan(seqs))
    hidden = engine.runner._sampled_hidden(hb, None)
    return engine.runner.model.logits(hidden).argmax(dim=-1)


def two_streams_case(a: LLMEngine, b: LLMEngine, batch: int, context: int, steps: int = 20) -> dict:
    """Decode steps of two models (the same batch and context each) run alternately on one
    stream against concurrently on two streams. The KV slot of each step is rewritten, so
    every repetition does the same work. Each engine's graphs must have their own memory pool
    (engine.py captures them so): graphs sharing a pool cannot run at the same time."""
    seqs = {e: prefilled(e, batch, context, extra_tokens=1) for e in (a, b)}
    streams = {a: torch.cuda.Stream(a.device), b: torch.cuda.Stream(b.device)}

    def alternated():
        for e in (a, b):
            _decode_launch(e, seqs[e])

    def concurrent():
        main = torch.cuda.current_stream(a.device)
        for e in (a, b):
            streams[e].wait_stream(main)
            with torch.cuda.stream(streams[e]):
                _decode_launch(e, seqs[e])
        for e in (a, b):
            main.wait_stream(streams[e])

    timed = {}
    with torch.inference_mode():
        for name, fn in (("alternated", alternated), ("concurrent", concurrent)):
            for _ in range(3):
                fn()
            synchronize(a.device)
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            synchronize(a.device)
            timed[name] = (time.perf_counter() - t0) / steps
    for e in (a, b):
        free(e, seqs[e])
    return dict(phase="two_streams", model=f"{a.model_id} + {b.model_id}", batch=batch, context=context,
                time_ms=timed["concurrent"] * 1e3, roofline_ms=timed["alternated"] * 1e3,
                roofline_ratio=timed["concurrent"] / timed["alternated"],
                note="ceiling column: the same two steps alternated on one stream")


def many_models_case(engines: list[LLMEngine], batch: int, context: int, rounds: int = 40) -> list[dict]:
    """Several models on one device, each decoding `batch` requests of `context` tokens, stepped
    in turn as a device worker steps them: each step waited for (one model per step, the
    engine without overlap), overlapped on one stream, and overlapped with each model on a
    stream of its own (its steps may run beside the others'). Aggregate output tokens/s; the
    ratio column is against one model per step."""
    prompts = random_prompts(engines[0].config.vocab_size, [context] * batch, seed=3)
    params = SamplingParams(temperature=0, max_tokens=1 << 20, ignore_eos=True)
    ids = {e: [e.add_request(p, params) for p in prompts] for e in engines}
    streams = {e: e.runner.stream for e in engines}
    modes = {"one model per step": (False, False), "overlap, one stream": (True, False),
             "overlap, a stream per model": (True, True)}
    rows = []
    try:
        for _ in range(3):  # prefill, then decodes
            for e in engines:
                e.step()
        for name, (overlap, own_stream) in modes.items():
            for e in engines:
                e.read_in_flight()
                e.overlap = overlap
                e.runner.stream = streams[e] if own_stream else None
            elapsed = _round_robin(engines, rounds)
            rows.append(dict(phase="many_models", mode=name, model=engines[0].source.name, models=len(engines),
                             batch=batch, context=context, time_ms=elapsed / rounds * 1e3,
                             tokens_per_s=len(engines) * batch * rounds / elapsed))
    finally:
        for e in engines:
            for req_id in ids[e]:
                e.abort(req_id)
            e.runner.stream = streams[e]
    base = rows[0]["tokens_per_s"]
    for row in rows:
        row["vs_one_model_per_step"] = row["tokens_per_s"] / base
    return rows


def _round_robin(engines: list[LLMEngine], rounds: int) -> float:
    for _ in range(3):  # warm the mode up
        for e in engines:
            e.step()
    for e in engines:
        e.read_in_flight()
    synchronize(engines[0].device)
    t0 = time.perf_counter()
    for _ in range(rounds):
        for e in engines:
            e.step()
    for e in engines:
        e.read_in_flight()
    synchronize(engines[0].device)
    return time.perf_counter() - t0


def mixed_step_case(engine: LLMEngine, prefill_tokens: int, decodes: int, context: int, repeats: int = 10) -> dict:
    """One step of a `prefill_tokens` prompt beside `decodes` decoding sequences (`context`
    tokens each): piecewise CUDA graphs against the same step eager (the ceiling column), and
    whether both sample the same tokens."""
    dec = prefilled(engine, decodes, context, extra_tokens=1) if decodes else []
    new = Sequence("mixed-prompt", random_prompts(engine.config.vocab_size, [prefill_tokens], seed=5)[0], GREEDY)
    assert engine.blocks.allocate(new, prefill_tokens), "not enough KV memory for the benchmark"
    plan = StepPlan((ScheduledChunk(new, 0, prefill_tokens), *decode_plan(dec).chunks))
    graphs, timed, launched, tokens = engine.runner.mixed_graphs, {}, {}, {}
    try:
        for name, mixed in (("graphs", graphs), ("eager", None)):
            engine.runner.mixed_graphs = mixed
            tokens[name] = [t for _, t, _ in engine.runner.execute(plan)]  # warm-up
            times, launches = [], []
            for _ in range(repeats):
                synchronize(engine.device)
                t0 = time.perf_counter()
                step = engine.runner.launch(plan, None)
                launches.append(time.perf_counter() - t0)  # the host thread held: what others wait for
                engine.runner.collect(step)
                synchronize(engine.device)
                times.append(time.perf_counter() - t0)
            timed[name], launched[name] = statistics.median(times), statistics.median(launches)
    finally:
        engine.runner.mixed_graphs = graphs
        free(engine, dec + [new])
    return dict(phase="mixed_step", model=engine.source.name, batch=decodes, context=context,
                prefill_tokens=prefill_tokens, graphs=graphs is not None and graphs.fits(prefill_tokens + decodes),
                time_ms=timed["graphs"] * 1e3, roofline_ms=timed["eager"] * 1e3,
                roofline_ratio=timed["graphs"] / timed["eager"], launch_ms=launched["graphs"] * 1e3,
                eager_launch_ms=launched["eager"] * 1e3, same_tokens=tokens["graphs"] == tokens["eager"],
                note="ceiling column: the same step eager; launch_ms: the launch call's host time")
