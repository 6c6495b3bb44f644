"""Tensor parallelism on CPU: two gloo ranks against one process (TP=1), on tiny models.

One pair of ranks is spawned for the whole module and runs every case (spawning costs more
than the cases); each test then checks one property of the results. Timeouts everywhere: a
hang fails the test instead of hanging CI.
"""
import json
import multiprocessing as mp
import time

import pytest
import torch

from conftest import make_tiny_checkpoint
from prism.config import ModelConfig
from prism.engine.catalog import resolve_model
from prism.engine.llm_engine import LLMEngine
from prism.engine.parallel import TPGroup, free_port
from prism.engine.tp_shard import TPError, TPShard, check_tp, shard_sizes
from prism.engine.weights import iter_random
from tp_worker import CPU, make_engine, run_case, run_rank

TP = 2
BIG = 64 << 20  # bytes of page budget: room for everything
RANK_TIMEOUT_S = 150

# A random-weight shape whose vocabulary does not divide by 2 (replicated LM head) and with
# one KV head (each rank keeps a copy of it).
ODD_SHAPE = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64,
    "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 1, "head_dim": 16, "vocab_size": 321, "max_position_embeddings": 256,
    "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": False,
    "bos_token_id": 1, "eos_token_id": 2,
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _ids(n: int, seed: int, vocab: int = 320) -> list[int]:
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _cases(root) -> list[dict]:
    llama = root / "llama"
    make_tiny_checkpoint(llama, "LlamaForCausalLM", attention_bias=True)  # o_proj bias too
    qwen2 = root / "qwen2"
    make_tiny_checkpoint(qwen2, "Qwen2ForCausalLM")
    qwen3 = root / "qwen3"
    make_tiny_checkpoint(qwen3, "Qwen3ForCausalLM")  # tied head: rows of the embedding
    odd = root / "odd.json"
    odd.write_text(json.dumps(ODD_SHAPE))
    prompts = [list(range(10, 27)), _ids(9, 3)]
    common = dict(ids=_ids(23, 1), prompt_len=13, prompts=prompts, memory=(BIG, BIG))
    # Rank 1's GPU is nearly full (other models there): KV runs out on it first, and both
    # ranks must preempt the same requests at the same step.
    weights = -(-TPShard(ModelConfig.from_json(llama / "config.json"), TP, 1).weight_bytes(4) // 4096)
    pressure = dict(prompts=[_ids(30, 10 + i) for i in range(4)],
                    memory=(BIG, (weights + 14) * 4096))
    return [
        dict(name="llama", source=str(llama), sample=True, evict=True, **common),
        dict(name="qwen2", source=str(qwen2), **common),
        dict(name="qwen3", source=str(qwen3), **common),
        dict(name="odd-random", source=str(odd), **common),
        dict(name="pressure", source=str(llama), params=_greedy(30), **pressure),
    ]


def _greedy(n: int):
    from prism.types import SamplingParams

    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)


def spawn_ranks(root, cases, size=TP, backend="gloo", engine_options=CPU) -> list[dict]:
    """Start `size` ranks running `cases`; call finish() for their results."""
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=run_rank, args=(r, size, port, cases, str(root), backend, engine_options),
                         daemon=True) for r in range(size)]
    for p in procs:
        p.start()

    def finish() -> list[dict]:
        deadline = time.monotonic() + RANK_TIMEOUT_S
        for p in procs:
            p.join(max(1.0, deadline - time.monotonic()))
        hung = [p for p in procs if p.is_alive()]
        for p in hung:
            p.kill()
        assert not hung, f"tensor-parallel ranks did not finish within {RANK_TIMEOUT_S} s"
        ranks = [torch.load(root / f"rank{r}.pt") for r in range(size)]
        for r, res in enumerate(ranks):
            assert "error" not in res, f"rank {r} failed:\n{res['error']}"
        return ranks

    return finish


def reference_results(cases, engine_options=CPU) -> dict:
    """TP=1, in this process."""
    results = {}
    for case in cases:
        engine = make_engine(case["source"], BIG, **engine_options)
        try:
            results[case["name"]] = run_case(engine, case)
        finally:
            engine.close()
    return results


@pytest.fixture(scope="module")
def tp_run(tmp_path_factory):
    """(cases by name, TP=1 results, [rank 0 results, rank 1 results])."""
    root = tmp_path_factory.mktemp("tp")
    cases = _cases(root)
    finish = spawn_ranks(root, cases)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the ranks need the cores more than the reference does
    try:
        reference = reference_results(cases)
    finally:
        torch.set_num_threads(threads)
        ranks = finish()
    return {c["name"]: c for c in cases}, reference, ranks


LOGIT_CASES = ["llama", "qwen2", "qwen3", "odd-random"]


@pytest.mark.parametrize("name", LOGIT_CASES)
def test_tp2_logits_match_tp1_in_prefill_and_decode(tp_run, name):
    cases, ref, ranks = tp_run
    prompt_len = cases[name]["prompt_len"]
    want = ref[name]["logits"]
    for r, res in enumerate(ranks):
        got = res[name]["logits"]
        assert got.shape == want.shape
        assert rel_err(got[:prompt_len], want[:prompt_len]) < 1e-4, f"rank {r} prefill"
        for row in range(prompt_len, want.shape[0]):
            assert rel_err(got[row], want[row]) < 1e-4, f"rank {r} decode at position {row}"


@pytest.mark.parametrize("name", LOGIT_CASES)
def test_tp2_greedy_generation_matches_tp1(tp_run, name):
    _, ref, ranks = tp_run
    assert all(len(t) == 12 for t in ref[name]["greedy"])
    for res in ranks:
        assert res[name]["greedy"] == ref[name]["greedy"]


def test_each_rank_holds_about_half_the_weights(tp_run):
    _, ref, ranks = tp_run
    for name in LOGIT_CASES:
        full, shard = ref[name]["weight_bytes"], ranks[0][name]["weight_bytes"]
        assert ranks[1][name]["weight_bytes"] == shard
        assert shard < 0.8 * full, name  # half, plus the replicated embedding and norms


def test_random_sampling_agrees_across_ranks(tp_run):
    _, _, ranks = tp_run
    assert ranks[0]["llama"]["sampled"] == ranks[1]["llama"]["sampled"]


def test_evict_and_activate_every_shard(tp_run):
    _, ref, ranks = tp_run
    for res in ranks:
        assert res["llama"]["after_activation"] == ref["llama"]["greedy"]
        assert res["llama"]["pages_left"] == 0


def test_kv_pressure_on_one_rank_preempts_on_both(tp_run):
    _, ref, ranks = tp_run
    assert ref["pressure"]["preemptions"] == 0
    assert ranks[0]["pressure"]["preemptions"] > 0
    assert ranks[0]["pressure"]["preemptions"] == ranks[1]["pressure"]["preemptions"]
    for res in ranks:
        assert res["pressure"]["greedy"] == ref["pressure"]["greedy"]  # recompute keeps greedy output


# ---- the shard plan (no processes) --------------------------------------------------------
def test_heads_that_do_not_divide_give_a_one_line_error(tmp_path):
    shape = dict(ODD_SHAPE, num_attention_heads=5, num_key_value_heads=5, hidden_size=80)
    path = tmp_path / "five-heads.json"
    path.write_text(json.dumps(shape))
    # Refused before any memory or collective: a group that was never started is enough.
    with pytest.raises(TPError) as err:
        LLMEngine(str(path), tp=TPGroup(rank=0, size=2))
    message = str(err.value)
    assert "\n" not in message
    assert "cannot be split across 2 GPUs" in message
    assert "num_attention_heads 5" in message and "num_key_value_heads 5" in message


@pytest.mark.parametrize("shape", ["llama-3.1-70b", "qwen2.5-32b"])
@pytest.mark.parametrize("tp", [2, 4, 8])
def test_large_shapes_split_at_tp_2_4_8(shape, tp):
    config = resolve_model(f"{shape}:random").config
    check_tp(config, tp)
    weight_bytes, kv_per_token = shard_sizes(config, tp, 2)
    full_bytes, full_kv = shard_sizes(config, 1, 2)
    embed = config.vocab_size * config.hidden_size * 2
    # Everything but the (replicated) embedding and norms divides by tp.
    assert weight_bytes == pytest.approx((full_bytes - embed) / tp + embed, rel=0.01)
    assert kv_per_token == full_kv // tp


def test_rank_slices_put_back_together_give_the_full_tensors():
    config = ModelConfig.from_hf_dict(dict(ODD_SHAPE, num_key_value_heads=2, vocab_size=320))
    full = dict(iter_random(config, seed=3))
    shards = [TPShard(config, TP, r) for r in range(TP)]
    for name, tensor in full.items():
        parts = [s.select(name, tensor) for s in shards]
        part = shards[0].slice_for(name)
        if part is None:
            assert all(p is tensor for p in parts), name
        else:
            assert torch.equal(torch.cat(parts, dim=part[0]), tensor), name


def test_replicated_kv_head_follows_its_query_heads():
    # 8 query heads, 2 KV heads, tp 4: ranks 0-1 use KV head 0, ranks 2-3 KV head 1.
    config = ModelConfig.from_hf_dict(dict(ODD_SHAPE, num_attention_heads=8, num_key_value_heads=2,
                                           hidden_size=128))
    starts = [TPShard(config, 4, r).slice_for("model.layers.0.self_attn.k_proj.weight")[1] for r in range(4)]
    assert starts == [0, 0, 16, 16]
    assert TPShard(config, 4, 0).config.num_kv_heads == 1


# ---- on a GPU (skipped without one) -------------------------------------------------------
def _check_against(reference: dict, ranks: list[dict], cases: list[dict]) -> None:
    for case in cases:
        name, prompt_len = case["name"], case["prompt_len"]
        want = reference[name]["logits"].cpu()
        for r, res in enumerate(ranks):
            got = res[name]["logits"].cpu()
            assert rel_err(got[:prompt_len], want[:prompt_len]) < 1e-4, f"{name} rank {r} prefill"
            assert rel_err(got[prompt_len:], want[prompt_len:]) < 1e-4, f"{name} rank {r} decode"
            assert res[name]["greedy"] == reference[name]["greedy"], f"{name} rank {r}"


@pytest.mark.gpu
def test_tp2_with_triton_kernels_on_one_gpu_matches_tp1(tmp_path):
    # Both ranks on cuda:0 through gloo (a one-GPU machine): the Triton kernels on the sharded
    # shapes (half the heads, one KV head on each rank, a tied head's rows), float32.
    cases = [c for c in _cases(tmp_path) if c["name"] in ("llama", "qwen3", "odd-random")]
    options = dict(device="cuda:0", kernels="triton", graph_batch=0)
    finish = spawn_ranks(tmp_path, cases, engine_options=options)
    try:
        reference = reference_results(cases, options)
    finally:
        ranks = finish()
    _check_against(reference, ranks, cases)


@pytest.mark.gpu
def test_nccl_all_reduces_replay_in_cuda_graphs(tmp_path):
    # A group of one NCCL rank: the all-reduces are real NCCL calls, captured in the decode
    # graphs, replayed (also after an eviction and activation) with the same results as the
    # plain engine's graphs.
    cases = [c for c in _cases(tmp_path) if c["name"] == "llama"]
    options = dict(device="cuda:0", kernels="triton", graph_batch=8)
    finish = spawn_ranks(tmp_path, cases, size=1, backend="nccl", engine_options=options)
    try:
        reference = reference_results(cases, options)
    finally:
        ranks = finish()
    _check_against(reference, ranks, cases)
    assert ranks[0]["llama"]["after_activation"] == reference["llama"]["greedy"]


def test_benchmark_script_runs_on_cpu(tmp_path):
    # The GPU benchmark's whole flow (spawned ranks, all cases, the report) on a tiny model.
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "tensor_parallel.py"
    out = tmp_path / "tp.json"
    proc = subprocess.run(
        [sys.executable, str(script), "--model", "tiny-llama:random", "--tp", "2", "--device", "cpu",
         "--backend", "gloo", "--batches", "1", "2", "--context", "16", "--prefill", "32", "--steps", "1",
         "--repeats", "1", "--memory-gib", "0.25", "--timeout-s", "120", "--out", str(out)],
        capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    (tp2,) = result["results"]
    assert tp2["tp"] == 2
    assert [c["phase"] for c in tp2["cases"]] == ["decode", "decode", "prefill", "activation"]
    assert all(c["time_ms"] > 0 and c["roofline_ms"] > 0 for c in tp2["cases"])
