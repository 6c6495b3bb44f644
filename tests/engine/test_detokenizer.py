"""Incremental detokenizer and stop-string matcher."""
import random

import pytest
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, normalizers
from transformers import PreTrainedTokenizerFast

from conftest import smollm2_gguf
from prism.engine.detokenizer import IncrementalDetokenizer, StopStringMatcher
from prism.engine.tokenizer import Tokenizer, load_tokenizer

TEXTS = [
    "Hello world, plain ASCII.",
    "Héllo, ça va? Übergrößenträger naïve",
    "emoji 😀👍🏽 and 👨‍👩‍👧 family 🇫🇷",
    "日本語のテキストと中文，还有한국어",
    "def f(x):\n\tif x:\n        return  x  # tab & spaces\n\n\n",
    " leading space",
]




@pytest.fixture(scope="module")
def smol() -> Tokenizer:
    return load_tokenizer(str(smollm2_gguf()))


@pytest.fixture(scope="module")
def sentencepiece_like() -> Tokenizer:
    """A Llama-2-style tokenizer: '▁' for spaces, byte fallback, leading-space strip.

    No merges and a tiny vocab, so every non-ASCII character becomes <0xNN> byte tokens.
    """
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{b:02X}>": 3 + b for b in range(256)})
    for ch in "▁abcdefghijklmnopqrstuvwxyzHTEPU,.?!:#()&":
        vocab.setdefault(ch, len(vocab))
    raw = RawTokenizer(models.BPE(vocab=vocab, merges=[], byte_fallback=True, unk_token="<unk>"))
    raw.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    raw.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    hf = PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    return Tokenizer(hf.backend_tokenizer)


def stream(tok: Tokenizer, ids: list[int], skip: bool) -> list[str]:
    detok = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    return [detok.step(i) for i in ids] + [detok.flush()]


@pytest.mark.parametrize("name", ["smol", "sentencepiece_like"])
@pytest.mark.parametrize("skip", [True, False])
def test_stream_equals_decode(request, name, skip):
    tok = request.getfixturevalue(name)
    for text in TEXTS:
        ids = tok.encode(text)
        assert "".join(stream(tok, ids, skip)) == tok.decode(ids, skip_special_tokens=skip)


def test_byte_fallback_held_until_complete(sentencepiece_like):
    tok = sentencepiece_like
    ids = tok.encode("a😀b")
    assert len(ids) == 1 + 1 + 4 + 1  # ▁, a, four bytes of the emoji, b
    pieces = stream(tok, ids, True)
    # Nothing for the first three emoji bytes, then the whole character at once.
    assert pieces == ["", "a", "", "", "", "😀", "b", ""]


def test_no_replacement_char_leaks(smol):
    for text in TEXTS:
        for piece in stream(smol, smol.encode(text), True):
            assert "\ufffd" not in piece


@pytest.mark.parametrize("name", ["smol", "sentencepiece_like"])
@pytest.mark.parametrize("skip", [True, False])
def test_special_tokens_in_stream(request, name, skip):
    tok = request.getfixturevalue(name)
    specials = [i for i, t in tok.backend.get_added_tokens_decoder().items() if t.special]
    rng = random.Random(0)
    for text in TEXTS:
        ids = tok.encode(text)
        # Sprinkle special tokens between characters, including at the start and the end.
        # (Not inside one: a ByteFallback decoder turns a whole byte run that is invalid UTF-8
        # into U+FFFDs, so a special token splitting "😀" changes text decoded before it.)
        for _ in range(3):
            cuts = [i for i in range(len(ids) + 1) if "\ufffd" not in tok.decode(ids[:i])]
            ids.insert(rng.choice(cuts), rng.choice(specials))
        assert "".join(stream(tok, ids, skip)) == tok.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("seed", range(5))
def test_random_ids_including_invalid_utf8(smol, seed):
    # Random byte-level tokens make broken UTF-8; the stream must still add up to decode().
    rng = random.Random(seed)
    ids = [rng.randrange(smol.vocab_size) for _ in range(300)]
    for skip in (True, False):
        assert "".join(stream(smol, ids, skip)) == smol.decode(ids, skip_special_tokens=skip)


def test_trailing_incomplete_bytes_released_by_flush(sentencepiece_like):
    tok = sentencepiece_like
    ids = tok.encode("ab😀")[:-1]  # cut the emoji's last byte: decode ends in U+FFFD
    detok = IncrementalDetokenizer(tok)
    out = "".join(detok.step(i) for i in ids)
    assert out == "ab"
    assert out + detok.flush() == tok.decode(ids)


def feed_all(matcher: StopStringMatcher, chunks: list[str]) -> tuple[str, bool]:
    out = []
    for chunk in chunks:
        text, hit = matcher.feed(chunk)
        out.append(text)
        if hit:
            return "".join(out), True
    return "".join(out) + matcher.flush(), False


def test_stop_split_across_small_feeds():
    text = "The answer is 42.\nObservation: done"
    chunks = [text[i : i + 2] for i in range(0, len(text), 2)]
    assert feed_all(StopStringMatcher(("\nObservation:",)), chunks) == ("The answer is 42.", True)


def test_stop_split_one_char_at_a_time():
    m = StopStringMatcher(("STOP",))
    outs = [m.feed(c) for c in "abSTOPcd"]
    assert outs[:2] == [("a", False), ("b", False)]
    assert outs[2:5] == [("", False)] * 3  # "S", "ST", "STO" held
    assert outs[5] == ("", True)
    assert m.feed("more") == ("", True)  # nothing after a hit
    assert m.flush() == ""


def test_several_stops_earliest_wins():
    m = StopStringMatcher(("world", "lo w", "xyz"))
    assert m.feed("hello world") == ("hel", True)


def test_stop_inside_one_chunk_drops_the_rest():
    m = StopStringMatcher(("</s>",))
    assert m.feed("abc</s>def") == ("abc", True)


def test_near_miss_prefix_released():
    m = StopStringMatcher(("<|end|>",))
    assert m.feed("a <|en") == ("a ", False)
    assert m.feed("d") == ("", False)
    assert m.feed("ing") == ("<|ending", False)
    assert m.feed("<") == ("", False)
    assert m.flush() == "<"


def test_near_miss_then_real_stop_overlapping():
    # "aab" with stop "ab": the first "a" is released once "aa" cannot start "ab".
    m = StopStringMatcher(("ab",))
    assert m.feed("a") == ("", False)
    assert m.feed("a") == ("a", False)
    assert m.feed("b") == ("", True)


def test_stop_at_the_very_start():
    assert StopStringMatcher(("Hello",)).feed("Hello there") == ("", True)
    m = StopStringMatcher(("Hello",))
    assert m.feed("Hel") == ("", False)
    assert m.feed("lo there") == ("", True)


def test_no_stops_passes_through():
    m = StopStringMatcher(())
    assert m.feed("anything") == ("anything", False)
    assert m.flush() == ""


def test_unicode_stop_with_detokenizer(smol):
    text = "日本語のテキスト。終わり。more"
    ids = smol.encode(text)
    detok, m = IncrementalDetokenizer(smol), StopStringMatcher(("終わり",))
    out, hit = [], False
    for i in ids:
        piece, hit = m.feed(detok.step(i))
        out.append(piece)
        if hit:
            break
    assert hit and "".join(out) == "日本語のテキスト。"
