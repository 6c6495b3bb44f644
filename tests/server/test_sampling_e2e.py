"""The sampling features end to end: a real `prism serve` (SmolLM2 on the CPU, worker
processes, loopback), the official `openai` client."""
import httpx
import openai
import pytest

from conftest import openai_client, running_server, smollm2_cpu_config

CONFIG = smollm2_cpu_config()

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("sampling"), CONFIG) as (_, base):
        yield base, openai_client(base)


def test_chat_logprobs_greedy_are_consistent_streamed_or_not(server):
    _, client = server
    kw = dict(model="smollm2", messages=MESSAGES, max_tokens=8, temperature=0, logprobs=True, top_logprobs=5)
    out = client.chat.completions.create(**kw)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens == 8
    for entry in content:
        tops = [t.logprob for t in entry.top_logprobs]
        assert len(tops) == 5 and tops == sorted(tops, reverse=True) and tops[0] <= 0.0
        # Greedy: the chosen token is the most likely one, with the same logprob.
        assert entry.top_logprobs[0].token == entry.token and entry.top_logprobs[0].logprob == entry.logprob
        assert entry.bytes == list(entry.token.encode())
    # Token texts joined give the text (and the end-of-turn token, which the text skips).
    assert "".join(e.token for e in content).startswith(out.choices[0].message.content)
    streamed = [e for c in client.chat.completions.create(stream=True, **kw)
                if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in content]


def test_completion_logprobs(server):
    _, client = server
    out = client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == 6 and "".join(lp.tokens) == out.choices[0].text
    for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert top[token] == logprob and max(top.values()) == logprob and len(top) == 3
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]


def test_logit_bias_makes_greedy_pick_the_token(server):
    base, client = server
    token = httpx.post(f"{base}/tokenize", json={"model": "smollm2", "prompt": " banana"}).json()["tokens"]
    assert len(token) == 1
    out = client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=4, temperature=0,
                                    logit_bias={str(token[0]): 100})
    assert out.choices[0].text == " banana" * 4
    chat = client.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=3, temperature=0,
                                          logit_bias={str(token[0]): 100})
    assert chat.choices[0].message.content == " banana" * 3


def test_penalties_change_a_repetitive_greedy_output(server):
    _, client = server
    prompt = "I like apples. I like apples. I like"
    plain = client.completions.create(model="smollm2", prompt=prompt, max_tokens=10, temperature=0)
    assert plain.choices[0].text.count("I'm") == 2  # it repeats itself
    for kw in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0},
               {"extra_body": {"repetition_penalty": 5.0}}):
        out = client.completions.create(model="smollm2", prompt=prompt, max_tokens=10, temperature=0, **kw)
        assert out.choices[0].text != plain.choices[0].text, kw


def test_min_p_one_is_greedy(server):
    _, client = server
    greedy = client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=8, temperature=0)
    for seed in (1, 2):
        out = client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=8, temperature=1.0, seed=seed,
                                        extra_body={"min_p": 1.0})
        assert out.choices[0].text == greedy.choices[0].text


def test_n_choices_seeded_reproducible_and_counted(server):
    _, client = server
    kw = dict(model="smollm2", messages=MESSAGES, max_tokens=10, temperature=1.0, seed=11, n=3)
    out = client.chat.completions.create(**kw)
    assert [c.index for c in out.choices] == [0, 1, 2]
    texts = [c.message.content for c in out.choices]
    assert len(set(texts)) > 1  # seeds 11, 12, 13: different draws
    # Choice i is the request alone with seed + i; usage counts the prompt once, every choice's tokens.
    singles = [client.chat.completions.create(**{**kw, "n": 1, "seed": 11 + i}) for i in range(3)]
    assert [s.choices[0].message.content for s in singles] == texts
    assert out.usage.prompt_tokens == singles[0].usage.prompt_tokens
    assert out.usage.completion_tokens == sum(s.usage.completion_tokens for s in singles)
    streamed = {}
    for c in client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=5, temperature=1.0, seed=3, n=2,
                                       stream=True):
        for choice in c.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + choice.text
    whole = client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=5, temperature=1.0, seed=3, n=2)
    assert streamed == {c.index: c.text for c in whole.choices}


def test_prompt_list_and_echo(server):
    _, client = server
    prompts = ["The capital of France is", "One plus one is"]
    out = client.completions.create(model="smollm2", prompt=prompts, max_tokens=4, temperature=0, echo=True)
    assert [c.index for c in out.choices] == [0, 1]
    for prompt, choice in zip(prompts, out.choices):
        alone = client.completions.create(model="smollm2", prompt=prompt, max_tokens=4, temperature=0)
        assert choice.text == prompt + alone.choices[0].text
    assert client.completions.create(model="tiny", prompt=[[5, 6], [7]], max_tokens=2).usage.prompt_tokens == 3


def test_tokenize_detokenize_round_trip(server):
    base, client = server
    tok = httpx.post(f"{base}/tokenize", json={"model": "smollm2", "prompt": PROMPT}).json()
    assert tok["count"] == len(tok["tokens"]) and tok["max_model_len"] == 512
    assert httpx.post(f"{base}/detokenize", json={"model": "smollm2", "tokens": tok["tokens"]}).json() == {
        "prompt": PROMPT}
    chat = httpx.post(f"{base}/tokenize", json={"model": "smollm2", "messages": MESSAGES}).json()
    usage = client.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=1).usage
    assert chat["count"] == usage.prompt_tokens


@pytest.mark.parametrize("kw, field", [
    (dict(logit_bias={"49152": 5}), "logit_bias"), (dict(n=17), "n"), (dict(presence_penalty=3), "presence_penalty"),
    (dict(frequency_penalty=-2.5), "frequency_penalty"), (dict(extra_body={"min_p": 2}), "min_p"),
    (dict(extra_body={"repetition_penalty": -1}), "repetition_penalty"), (dict(logprobs=21), "logprobs"),
    (dict(echo=True, logprobs=1), "echo"),
])
def test_bad_values_are_400_naming_the_field(server, kw, field):
    _, client = server
    with pytest.raises(openai.BadRequestError, match=field):
        client.completions.create(model="smollm2", prompt=PROMPT, max_tokens=2, **kw)


def test_bad_chat_logprobs_are_400(server):
    _, client = server
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=2, logprobs=True, top_logprobs=21)
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(model="smollm2", messages=MESSAGES, max_tokens=2, top_logprobs=2)
    assert client.models.retrieve("smollm2").id == "smollm2"  # still serving
