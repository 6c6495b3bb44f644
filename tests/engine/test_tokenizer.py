"""The torch-free tokenizer against transformers' own, over the SmolLM2-135M-Instruct GGUF (its
metadata holds the tokenizer) and over an HF folder exported from it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

import prism
from conftest import smollm2_gguf
from prism.cli import main
from prism.engine.tokenizer import Tokenizer, TokenizerLoadError, load_tokenizer
from prism.engine.tokenizer_export import export_tokenizer
from prism.types import RequestError

TEXTS = [
    "Hello world",
    "  leading spaces and trailing  ",
    "Héllo, ça va? Übergrößenträger",
    "emoji 😀👍🏽 and 👨‍👩‍👧 family",
    "日本語のテキストと中文",
    "def f(x):\n\treturn x  # tab\n\n",
    "<|im_start|>user\nhi<|im_end|>",
    "",
    " \n\n\n   \t\t  x   ",
    "<|endoftext|><|im_end|>text<|im_start|>",
]

CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
    [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi! 😀"},
        {"role": "user", "content": "日本語で"},
    ],
    [
        {"role": "system", "content": "  spaces  \n"},
        {"role": "user", "content": "a <|im_end|> inside"},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": "and again", "name": None},
    ],
]




@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_tokenizer(str(smollm2_gguf()))


@pytest.fixture(scope="module")
def hf():
    path = smollm2_gguf()
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("exported")
    export_tokenizer(str(smollm2_gguf()), str(out))
    return str(out)


@pytest.fixture(scope="module", params=["gguf", "folder"])
def pair(request, tok, hf, folder):
    """(ours, transformers') over the GGUF, and over the exported folder read by both."""
    if request.param == "gguf":
        return tok, hf
    return load_tokenizer(folder), AutoTokenizer.from_pretrained(folder)


def test_encode_matches_transformers(pair):
    ours, theirs = pair
    for text in TEXTS:
        assert ours.encode(text) == theirs(text).input_ids


def test_decode_matches_transformers(pair):
    ours, theirs = pair
    for text in TEXTS:
        ids = theirs(text).input_ids
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == theirs.decode(ids, skip_special_tokens=skip)


def _hf_chat_ids(hf, messages) -> list[int]:
    want = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if hasattr(want, "keys"):  # transformers 5 returns a BatchEncoding here
        want = want["input_ids"]
    return list(want)


def test_chat_template_matches_transformers(pair):
    ours, theirs = pair
    for messages in CONVERSATIONS:
        got = ours.apply_chat_template(messages)
        assert got == _hf_chat_ids(theirs, messages)
        assert ours.decode(got, skip_special_tokens=False).endswith("<|im_start|>assistant\n")


# A template using what transformers' environment offers: special-token variables, tojson
# (no HTML escaping), namespace, dict, loop controls, raise_exception, trim/lstrip blocks.
RICH_TEMPLATE = """{{ bos_token }}{% set ns = namespace(n=0) %}
{% for m in messages %}
  {% if m.role not in ["system", "user", "assistant"] %}{{ raise_exception("bad role " + m.role) }}{% endif %}
  {% set ns.n = ns.n + 1 %}
  {% if m.content == "skip" %}{% continue %}{% endif %}
<|im_start|>{{ m.role }}
{{ m.content | tojson }} {{ dict(a=1) | tojson }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}<|im_start|>assistant n={{ ns.n }} {{ eos_token }}
{% endif %}"""


def test_rich_template_matches_transformers(tok, hf):
    ours = Tokenizer(tok.backend, chat_template=RICH_TEMPLATE, special_tokens=tok.special_tokens)
    original, hf.chat_template = hf.chat_template, RICH_TEMPLATE
    try:
        for messages in CONVERSATIONS + [[{"role": "user", "content": "<a & 'b'>"}, {"role": "user", "content": "skip"}]]:
            assert ours.apply_chat_template(messages) == _hf_chat_ids(hf, messages)
        with pytest.raises(RequestError, match="bad role tool"):
            ours.apply_chat_template([{"role": "tool", "content": "x"}])
    finally:
        hf.chat_template = original


def test_gguf_does_not_add_bos(tok):
    # The GGUF says tokenizer.ggml.add_bos_token = False.
    assert tok.encode("Hello world") == [19556, 905]


def test_special_ids_and_vocab(tok):
    assert [tok.backend.token_to_id(t) for t in ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]] == [0, 1, 2]
    assert tok.eos_token_ids == (2,)  # <|im_end|>: the GGUF's eos, which ends chat turns
    assert tok.vocab_size == 49152


def test_decode_roundtrip(tok):
    for text in TEXTS[:-1]:
        if "<|" not in text:
            assert tok.decode(tok.encode(text)) == text
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>")
    assert tok.decode(ids) == "user\nhi"
    assert tok.decode(ids, skip_special_tokens=False) == "<|im_start|>user\nhi<|im_end|>"


def test_load_is_cached(tok):
    assert load_tokenizer(str(smollm2_gguf())) is tok


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
    bare = Tokenizer(tok.backend)
    with pytest.raises(RequestError, match="no chat template"):
        bare.apply_chat_template([{"role": "user", "content": "hi"}])


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


def test_hf_folder_and_generation_config_eos(tok, hf, tmp_path):
    # Save the GGUF's tokenizer as an HF folder, add a generation config listing two eos ids.
    hf.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [2, 0]}')
    folder_tok = load_tokenizer(str(tmp_path))
    assert folder_tok.eos_token_ids == (2, 0)
    for text in TEXTS:
        assert folder_tok.encode(text) == tok.encode(text)


def test_export_keeps_gguf_eos_and_template(folder, tok):
    exported = load_tokenizer(folder)
    assert exported.eos_token_ids == tok.eos_token_ids == (2,)
    assert exported.chat_template == tok.chat_template and exported.special_tokens == tok.special_tokens


def test_prism_tokenizer_command(tmp_path, hf, capsys):
    out = tmp_path / "tok"
    assert main(["tokenizer", "--model", "smollm2-135m", "--out", str(out)]) == 0
    loaded = AutoTokenizer.from_pretrained(out)
    for text in TEXTS:
        assert loaded(text).input_ids == hf(text).input_ids
    for messages in CONVERSATIONS:
        assert _hf_chat_ids(loaded, messages) == _hf_chat_ids(hf, messages)


def test_prism_tokenizer_command_without_tokenizer(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({**json.loads(SHIPPED.read_text()), "vocab_size": 1000}))
    assert main(["tokenizer", "--model", str(config), "--out", str(tmp_path / "tok")]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


SHIPPED = next((Path(prism.__file__).parent / "models" / "configs").glob("*.json"))


def test_load_in_a_fresh_process_imports_no_torch(tmp_path):
    # A fresh cache: the first load exports in a child process, the second reads the cache.
    code = ("import sys; from prism.engine.tokenizer import load_tokenizer; "
            f"t = load_tokenizer({str(smollm2_gguf())!r}); assert t.encode('hi'); "
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    env = {**os.environ, "PRISM_TOKENIZER_CACHE": str(tmp_path)}
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "False False"
    assert len(list(tmp_path.iterdir())) == 1  # one export, reused
