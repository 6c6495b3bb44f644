"""Tokenizer loading (HF folder or GGUF file) behind a small torch-free wrapper.

The frontend loads one per model and must not import torch, so transformers (which imports
torch when it is installed) only runs in a child process, in prism.engine.tokenizer_export.
"""
from __future__ import annotations

import functools
import hashlib
import json
import mmap
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Any

from prism import env
from prism.engine.catalog import TOKENIZER_FILES
from prism.errors import UserError
from prism.types import RequestError

# An exported folder's extra file (see prism.engine.tokenizer_export), and the stderr line
# prefix of the exporting child's one-line error.
PRISM_FILE = "prism_tokenizer.json"
ERROR_MARK = "prism-tokenizer-export-error: "

# GGUF metadata keys that name ids which end a generation (llama.cpp's conventions).
_GGUF_EOS_KEYS = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")


class TokenizerLoadError(UserError):
    """A tokenizer could not be loaded: missing, unreadable or corrupt files."""


class Tokenizer:
    """A model's tokenizer over the `tokenizers` library, with chat templates rendered by jinja2.

    Torch-free (no transformers), so the frontend can load one per model. Encodes, decodes and
    renders chat templates exactly as transformers' tokenizer of the same folder does
    (tests/engine/test_tokenizer.py checks it against transformers).
    """

    def __init__(
        self,
        backend: Any,  # tokenizers.Tokenizer
        eos_token_ids: tuple[int, ...] = (),
        chat_template: str | None = None,
        special_tokens: dict[str, str] | None = None,  # bos_token, eos_token...: template variables
        clean_up_tokenization_spaces: bool = False,
    ):
        self.backend = backend
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(int(i) for i in eos_token_ids))
        self.chat_template = chat_template
        self.special_tokens = dict(special_tokens or {})
        self._clean_up = clean_up_tokenization_spaces

    @classmethod
    def from_folder(cls, folder: str) -> Tokenizer:
        """An HF tokenizer folder (tokenizer.json, tokenizer_config.json...), as exported or saved."""
        from tokenizers import Tokenizer as Backend

        backend = Backend.from_file(os.path.join(folder, "tokenizer.json"))
        config = _read_json(os.path.join(folder, "tokenizer_config.json"))
        config_map = _read_json(os.path.join(folder, "special_tokens_map.json"))
        # transformers' special_tokens_map: the named tokens only, as plain strings.
        specials = {}
        for attr in _SPECIAL_TOKEN_ATTRIBUTES:
            value = config.get(attr, config_map.get(attr))
            if isinstance(value, dict):  # a serialized AddedToken
                value = value.get("content")
            if isinstance(value, str):
                specials[attr] = value
        template = _chat_template(folder, config)
        prism = _read_json(os.path.join(folder, PRISM_FILE))
        if "eos_token_ids" in prism:  # exported by prism.engine.tokenizer_export
            eos = _as_id_list(prism["eos_token_ids"])
        else:
            eos_id = backend.token_to_id(specials["eos_token"]) if "eos_token" in specials else None
            eos = ([eos_id] if eos_id is not None else []) + _folder_eos_ids(folder)
        clean_up = bool(prism.get("clean_up_tokenization_spaces", False))
        return cls(backend, tuple(eos), template, specials, clean_up)

    @property
    def vocab_size(self) -> int:
        # Added tokens count too (e.g. chat markers), as len() of a transformers tokenizer.
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if not isinstance(text, str):
            raise RequestError(f"prompt must be a string, got {type(text).__name__}")
        # Same as transformers' tokenizer(text).input_ids: the post-processor adds BOS if the
        # checkpoint asks for it.
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None,
                            add_generation_prompt: bool = True) -> list[int]:
        """The prompt's ids; `tools` (OpenAI's tool definitions) reach the template's `tools`."""
        _check_messages(messages)
        if not self.chat_template:
            raise RequestError("this model's tokenizer has no chat template; send a plain prompt instead")
        from jinja2 import TemplateError

        # As transformers: keys whose value is None are dropped, the special tokens are
        # variables, kwargs (add_generation_prompt) override them.
        chat = [{k: v for k, v in m.items() if v is not None} for m in messages]
        try:
            text = _compile(self.chat_template).render(
                **self.special_tokens, messages=chat, tools=tools or None, documents=None,
                add_generation_prompt=add_generation_prompt,
            )
        except TemplateError as e:  # e.g. the template's raise_exception("roles must alternate")
            raise RequestError(f"chat template rejected the messages: {e}") from None
        except (TypeError, KeyError, AttributeError) as e:  # a template that assumes what it was not given
            raise RequestError(f"chat template could not render the messages: {type(e).__name__}: {e}") from None
        # The template wrote the special tokens (BOS...) itself: don't add them again.
        return self.backend.encode(text, add_special_tokens=False).ids

    @functools.cached_property
    def template_supports_tools(self) -> bool:
        """The chat template reads the `tools` variable (Llama 3.1+, Qwen2.5...)."""
        return bool(self.chat_template) and "tools" in _template_variables(self.chat_template)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        text = self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self._clean_up else text


# transformers' SPECIAL_TOKENS_ATTRIBUTES: what a chat template sees as variables.
_SPECIAL_TOKEN_ATTRIBUTES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def _chat_template(folder: str, config: dict) -> str | None:
    """chat_template.jinja (transformers 5's default), else tokenizer_config.json's chat_template
    (a string, or named templates of which transformers uses "default")."""
    jinja_file = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(jinja_file):
        with open(jinja_file, encoding="utf-8") as f:
            return f.read()
    template = config.get("chat_template")
    if isinstance(template, list):
        template = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}.get("default")
    return template if isinstance(template, str) else None


def _clean_up_tokenization(text: str) -> str:
    # transformers' clean_up_tokenization (WordPiece-era; exporters turn it off for BPE).
    for old, new in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                     (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(old, new)
    return text


@functools.lru_cache(maxsize=32)
def _compile(template: str) -> Any:
    """The template in the environment transformers renders chat templates in
    (transformers/utils/chat_template_utils.py): sandboxed, trim_blocks and lstrip_blocks,
    raise_exception, strftime_now, a tojson that does not escape HTML, a safe dict/namespace."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        # {% generation %}...{% endgeneration %} marks assistant text (for training masks);
        # rendering just keeps the body.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class Namespace(jinja2.utils.Namespace):
        # Rejects underscore names, so a template cannot reach CPython internals.
        def __init__(*args, **kwargs):
            self, attrs = args[0], dict(*args[1:], **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"cannot set underscore-prefixed attribute {name!r}")

    class Dict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals.update(
        raise_exception=raise_exception,
        strftime_now=lambda fmt: datetime.now().strftime(fmt),
        dict=Dict(),
        namespace=Namespace,
    )
    return env.from_string(template)


@functools.lru_cache(maxsize=32)
def _template_variables(template: str) -> frozenset[str]:
    import jinja2.meta

    return frozenset(jinja2.meta.find_undeclared_variables(_compile(template).environment.parse(template)))


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise RequestError("messages must be a non-empty list of {role, content} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RequestError(f"messages[{i}] must be an object with 'role' and 'content'")
        if not isinstance(m.get("role"), str):
            raise RequestError(f"messages[{i}].role must be a string")
        # An assistant's turn that only calls tools has no content (OpenAI sends null).
        if not isinstance(m.get("content"), str) and not (m.get("content") is None and m.get("tool_calls")):
            raise RequestError(f"messages[{i}].content must be a string")


def load_tokenizer(path: str) -> Tokenizer:
    """Load (once per path) the tokenizer of an HF folder or a .gguf file, without transformers.

    A folder Prism exported (prism tokenizer) is read directly. Anything else (a GGUF, any
    checkpoint folder) is first exported by a child process, cached by the source's path,
    size and mtime: transformers would import torch into this process, and only its own
    loading applies what some tokenizer classes change at load time (e.g. Llama's BOS).
    """
    return _load_cached(os.path.abspath(os.fspath(path)))


@functools.lru_cache(maxsize=32)
def _load_cached(path: str) -> Tokenizer:
    if not os.path.exists(path):
        raise TokenizerLoadError(f"cannot load tokenizer from {path}: no such file or directory")
    try:
        if os.path.isdir(path) and os.path.isfile(os.path.join(path, PRISM_FILE)):
            return Tokenizer.from_folder(path)
        return Tokenizer.from_folder(_exported(path))
    except TokenizerLoadError:
        raise
    except Exception as e:  # tokenizers and json raise their own types (Exception, ValueError...)
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise TokenizerLoadError(f"cannot load tokenizer from {path}: {reason}") from None


def _exported(path: str) -> str:
    """The cached HF export of path's tokenizer, made by a child process if missing."""
    if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
        raise TokenizerLoadError(f"cannot load tokenizer from {path}: no tokenizer files in the folder")
    if os.path.isfile(path):
        with open(path, "rb") as f:
            if path.endswith(".gguf") and f.read(4) != b"GGUF":  # fail fast, without a child
                raise TokenizerLoadError(f"cannot load tokenizer from {path}: not a GGUF file")
    st = os.stat(path)
    key = hashlib.sha256(f"{path}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:16]
    out = env.tokenizer_cache_dir() / f"{os.path.basename(path.rstrip(os.sep))}-{key}"
    if (out / PRISM_FILE).is_file():
        return str(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # Export into a temporary folder and rename it: concurrent loaders (workers, the frontend)
    # never see a half-written export.
    tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
    try:
        done = subprocess.run([sys.executable, "-m", "prism.engine.tokenizer_export", path, str(tmp)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            lines = done.stderr.strip().splitlines() or [f"exit code {done.returncode}"]
            reason = next((ln[len(ERROR_MARK):] for ln in lines if ln.startswith(ERROR_MARK)), lines[-1])
            raise TokenizerLoadError(f"cannot load tokenizer from {path}: {reason}")
        try:
            os.rename(tmp, out)
        except OSError:  # another process finished first: use its export
            if not (out / PRISM_FILE).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


def _as_id_list(value: Any) -> list[int]:
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value if isinstance(v, int)]
    return []


def _folder_eos_ids(folder: str) -> list[int]:
    """eos ids from generation_config.json and config.json (chat models often list several)."""
    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        file = os.path.join(folder, name)
        if not os.path.isfile(file):
            continue
        with open(file) as f:
            ids += _as_id_list(json.load(f).get("eos_token_id"))
    return ids


def _gguf_eos_ids(file: str) -> list[int]:
    meta = _gguf_scalar_metadata(file, _GGUF_EOS_KEYS)
    return [int(meta[k]) for k in _GGUF_EOS_KEYS if isinstance(meta.get(k), int)]


# GGUF value type -> struct format, for the scalar types; 8 is string, 9 is array.
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def _gguf_scalar_metadata(file: str, keys: tuple[str, ...]) -> dict[str, Any]:
    """Read a few scalar metadata values of a GGUF header.

    gguf.GGUFReader would take ~2 s here: it decodes every array (the whole vocab, the merges)
    and the tensor table; this walks the key/value section only, skipping arrays by length.
    """
    with open(file, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise ValueError(f"{file} is not a GGUF file")
        (kv_count,) = struct.unpack_from("<Q", buf, 16)  # after magic, version u32, tensor count u64
        pos, out = 24, {}
        for _ in range(kv_count):
            (n,) = struct.unpack_from("<Q", buf, pos)
            key = bytes(buf[pos + 8 : pos + 8 + n]).decode("utf-8", "replace")
            (vtype,) = struct.unpack_from("<I", buf, pos + 8 + n)
            pos += 12 + n
            if vtype in _GGUF_SCALARS and key in keys:
                (out[key],) = struct.unpack_from("<" + _GGUF_SCALARS[vtype], buf, pos)
            pos = _gguf_skip_value(buf, pos, vtype)
        return out


def _gguf_skip_value(buf: mmap.mmap, pos: int, vtype: int) -> int:
    if vtype in _GGUF_SCALARS:
        return pos + struct.calcsize("<" + _GGUF_SCALARS[vtype])
    if vtype == 8:
        return pos + 8 + struct.unpack_from("<Q", buf, pos)[0]
    if vtype != 9:
        raise ValueError(f"unknown GGUF value type {vtype}")
    itype, count = struct.unpack_from("<IQ", buf, pos)
    pos += 12
    if itype in _GGUF_SCALARS:  # fixed-size items: jump over them at once
        return pos + count * struct.calcsize("<" + _GGUF_SCALARS[itype])
    for _ in range(count):  # strings (vocab, merges) or nested arrays: walk item by item
        pos = _gguf_skip_value(buf, pos, itype)
    return pos
