"""Structured output: grammars over a model's tokenizer, and one matcher per sequence.

Mechanism only, torch-free (the frontend validates grammars with it, the worker's engine core
keeps a matcher beside each sequence that has a grammar). The grammar library is llguidance
(docs/api.md says why): a request's grammar arrives as llguidance's serialized grammar (JSON
text, built by the frontend from a JSON schema), is compiled once per (tokenizer, grammar) and
every sequence gets a cheap deep copy of the compiled matcher.

Consistency with preemption and eviction: a matcher has consumed exactly the sequence's output
tokens. Recompute preemption and eviction keep a sequence's outputs (only its KV goes), so the
matcher stays valid as it is; `GrammarState.sync` re-derives it from the outputs if the two ever
disagree, so the mask is always the one for the tokens the sequence really has.
"""
from __future__ import annotations

import functools
import logging
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

from prism.types import RequestError

if TYPE_CHECKING:
    from prism.engine.tokenizer import Tokenizer

log = logging.getLogger("prism.structured")

INSTALL_HINT = "pip install 'prism[structured]' (the llguidance package)"
COMPILED_CACHE_SIZE = 256  # compiled grammars kept per tokenizer (a schema is reused across requests)


class StructuredOutputUnavailable(RequestError):
    """A request asks for structured output but the grammar library is not installed (a 400)."""


class GrammarError(RequestError):
    """A grammar (a JSON schema) the library cannot compile: the message says why (a 400)."""


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise StructuredOutputUnavailable(
            f"structured output (response_format, tool_choice) needs the grammar library on this server: {INSTALL_HINT}"
        ) from None
    return llguidance


def available() -> bool:
    try:
        _llguidance()
    except StructuredOutputUnavailable:
        return False
    return True


def json_schema_grammar(schema: dict) -> str:
    """llguidance's serialized grammar for JSON matching `schema`, compact (no free whitespace:
    a small model given room for whitespace can spend its whole budget on it)."""
    llg = _llguidance()
    try:
        return llg.LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
    except ValueError as e:
        raise GrammarError(f"invalid JSON schema: {e}") from None


def regex_grammar(regex: str) -> str:
    """The grammar of text matching `regex` (Rust regex syntax, whole output)."""
    return _llguidance().grammar_from("regex", regex)


def choice_grammar(choices: list[str]) -> str:
    """The grammar of exactly one of `choices`."""
    return _llguidance().grammar_from("choice", choices)


class GrammarCompiler:
    """One tokenizer's grammars: validation, and compiled matchers cached by grammar text."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int | None = None):
        """`vocab_size`: the model's logits width (may exceed the tokenizer's: padded rows are
        never allowed)."""
        llg = _llguidance()
        self.vocab_size = max(vocab_size or 0, tokenizer.vocab_size)
        try:
            self.ll_tokenizer = llg.LLTokenizer(tokenizer.backend.to_str(), n_vocab=self.vocab_size,
                                                eos_token=list(tokenizer.eos_token_ids) or None)
        except Exception as e:  # a tokenizer kind the library cannot read: the request's problem, not a crash
            raise StructuredOutputUnavailable(f"structured output is not available for this model's tokenizer: {e}") from None
        self.eos_token_ids = tuple(self.ll_tokenizer.eos_tokens)
        self._compiled: OrderedDict[str, Any] = OrderedDict()
        self._checked: OrderedDict[str, None] = OrderedDict()  # grammars known to be valid (the frontend's)

    def check(self, grammar: str) -> None:
        """GrammarError naming the problem when `grammar` does not compile for this tokenizer."""
        if grammar in self._checked:
            return
        llg = _llguidance()
        error = llg.LLMatcher.validate_grammar(grammar, self.ll_tokenizer)
        if error and not error.startswith("WARNING"):
            raise GrammarError(f"invalid grammar: {error}")
        self._checked[grammar] = None
        if len(self._checked) > COMPILED_CACHE_SIZE:
            self._checked.popitem(last=False)

    def state(self, grammar: str) -> GrammarState:
        """A fresh matcher for one sequence (a copy of the compiled grammar)."""
        template = self._compiled.get(grammar)
        if template is None:
            llg = _llguidance()
            template = llg.LLMatcher(self.ll_tokenizer, grammar, log_level=0)
            if template.is_error():
                raise GrammarError(f"invalid grammar: {template.get_error()}")
            self._compiled[grammar] = template
            if len(self._compiled) > COMPILED_CACHE_SIZE:
                self._compiled.popitem(last=False)
        else:
            self._compiled.move_to_end(grammar)
        return GrammarState(template.deep_copy(), self.eos_token_ids, self.vocab_size)


@functools.lru_cache(maxsize=32)
def compiler_for(tokenizer: Tokenizer, vocab_size: int | None = None) -> GrammarCompiler:
    """The compiler of a tokenizer (building llguidance's view of a vocabulary takes a while)."""
    return GrammarCompiler(tokenizer, vocab_size)


class GrammarState:
    """One sequence's matcher: it has consumed `num_tokens` of the sequence's output tokens."""

    def __init__(self, matcher: Any, eos_token_ids: tuple[int, ...], vocab_size: int):
        self.matcher = matcher
        self.eos_token_ids = eos_token_ids  # what a broken matcher's row may still sample: an end
        self.vocab_size = vocab_size  # the matcher's masks' width (at least the logits')
        self.num_tokens = 0

    def advance(self, token: int) -> bool:
        """Consume one sampled token; True when the grammar is now complete (or broken: a token
        the mask did not allow), i.e. the sequence must stop."""
        self.num_tokens += 1
        ok = self.matcher.consume_token(token)
        if not ok:
            log.warning("a sampled token broke its grammar: %s", self.matcher.get_error())
        return not ok or self.matcher.is_stopped()

    def sync(self, output_token_ids: list[int]) -> None:
        """Bring the matcher to exactly `output_token_ids` (normally already there)."""
        n = len(output_token_ids)
        if n < self.num_tokens:
            self.matcher.rollback(self.num_tokens - n)
            self.num_tokens = n
        elif n > self.num_tokens:
            self.matcher.consume_tokens(output_token_ids[self.num_tokens:])
            self.num_tokens = n

    @property
    def broken(self) -> bool:
        return self.matcher.is_error()
