"""Tokenizer wrapper over the SmolLM2-135M-Instruct GGUF (its metadata holds the tokenizer)."""

import pytest

from conftest import smollm2_gguf
from prism.engine.tokenizer import Tokenizer, TokenizerLoadError, load_tokenizer
from prism.types import RequestError

TEXTS = [
    "Hello world",
    "  leading spaces and trailing  ",
    "Héllo, ça va? Übergrößenträger",
    "emoji 😀👍🏽 and 👨‍👩‍👧 family",
    "日本語のテキストと中文",
    "def f(x):\n\treturn x  # tab\n\n",
    "<|im_start|>user\nhi<|im_end|>",
]




@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_tokenizer(str(smollm2_gguf()))


def test_encode_matches_transformers(tok):
    for text in TEXTS:
        assert tok.encode(text) == tok.hf(text).input_ids
        # ... and the raw tokenizers backend, so the wrapper adds nothing of its own.
        assert tok.encode(text) == tok.hf.backend_tokenizer.encode(text).ids


def test_gguf_does_not_add_bos(tok):
    # The GGUF says tokenizer.ggml.add_bos_token = False.
    assert tok.encode("Hello world") == [19556, 905]


def test_special_ids_and_vocab(tok):
    assert tok.hf.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert tok.eos_token_ids == (2,)  # <|im_end|>: the GGUF's eos, which ends chat turns
    assert tok.vocab_size == 49152


def test_decode_roundtrip(tok):
    for text in TEXTS[:-1]:
        assert tok.decode(tok.encode(text)) == text
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert tok.decode(ids) == "user\nhi"
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>"


def test_load_is_cached(tok):
    assert load_tokenizer(str(smollm2_gguf())) is tok


def test_chat_template_matches_transformers(tok):
    conversations = [
        [{"role": "user", "content": "hi"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
        [
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Hi! 😀"},
            {"role": "user", "content": "日本語で"},
        ],
    ]
    for messages in conversations:
        want = tok.hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if hasattr(want, "keys"):  # transformers 5 returns a BatchEncoding here
            want = want["input_ids"]
        got = tok.apply_chat_template(messages)
        assert got == list(want)
        assert tok.decode(got, skip_special_tokens=False).endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize(
    "messages",
    [
        "hi",
        [],
        None,
        ["hi"],
        [{"role": "user"}],
        [{"content": "hi"}],
        [{"role": "user", "content": 3}],
        [{"role": None, "content": "hi"}],
        [{"role": "user", "content": "hi"}, "oops"],
    ],
)
def test_bad_messages(tok, messages):
    with pytest.raises(RequestError):
        tok.apply_chat_template(messages)


def test_no_chat_template(tok):
    bare = Tokenizer(_NoTemplate(tok.hf))
    with pytest.raises(RequestError, match="no chat template"):
        bare.apply_chat_template([{"role": "user", "content": "hi"}])


class _NoTemplate:
    """Delegates to a real tokenizer but has no chat template."""

    chat_template = None

    def __init__(self, hf):
        self._hf = hf

    def __getattr__(self, name):
        return getattr(self._hf, name)


def test_encode_rejects_non_string(tok):
    with pytest.raises(RequestError):
        tok.encode(["not", "a", "string"])


@pytest.mark.parametrize("name", ["missing.gguf", "missing_folder"])
def test_missing_path(tmp_path, name):
    path = str(tmp_path / name)
    with pytest.raises(TokenizerLoadError) as info:
        load_tokenizer(path)
    assert isinstance(info.value, ValueError)
    msg = str(info.value)
    assert path in msg and "\n" not in msg


def test_corrupt_gguf(tmp_path):
    path = tmp_path / "bad.gguf"
    path.write_bytes(b"not a gguf file at all")
    with pytest.raises(TokenizerLoadError) as info:
        load_tokenizer(str(path))
    assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_folder_without_tokenizer(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(TokenizerLoadError) as info:
        load_tokenizer(str(tmp_path))
    assert str(tmp_path) in str(info.value) and "\n" not in str(info.value)


def test_hf_folder_and_generation_config_eos(tok, tmp_path):
    # Save the GGUF's tokenizer as an HF folder, add a generation config listing two eos ids.
    tok.hf.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [2, 0]}')
    folder_tok = load_tokenizer(str(tmp_path))
    assert folder_tok.eos_token_ids == (2, 0)
    for text in TEXTS:
        assert folder_tok.encode(text) == tok.encode(text)
