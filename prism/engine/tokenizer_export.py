"""Export a model's tokenizer (HF folder or .gguf file) as a plain Hugging Face tokenizer folder.

This is the only place that loads tokenizers with transformers. transformers 5 imports torch
whenever torch is installed, so the frontend never calls this in-process: load_tokenizer runs
`python -m prism.engine.tokenizer_export SOURCE OUT` in a child and reads OUT with the
`tokenizers` library. `prism tokenizer` calls it directly, for third-party clients.

OUT holds what transformers writes (tokenizer.json, tokenizer_config.json with the chat template
inline, so older readers find it too), special_tokens_map.json, and prism_tokenizer.json: the
ids that end a generation (the tokenizer's eos, generation_config's, the GGUF's eot/eom) and
whether decode cleans up tokenization spaces, which tokenizer.json alone does not say.
"""
from __future__ import annotations

import json
import os
import sys

from prism.engine.tokenizer import ERROR_MARK, PRISM_FILE, _folder_eos_ids, _gguf_eos_ids


def export_tokenizer(source: str, out_dir: str) -> None:
    """Write source's tokenizer into out_dir (created if missing). Raises what transformers raises."""
    from transformers import AutoTokenizer  # here only: it imports torch

    source = os.path.abspath(source)
    if os.path.isfile(source) and source.endswith(".gguf"):
        hf = AutoTokenizer.from_pretrained(os.path.dirname(source), gguf_file=os.path.basename(source))
        extra = _gguf_eos_ids(source)
    else:
        hf = AutoTokenizer.from_pretrained(source)
        extra = _folder_eos_ids(source)
    if not hasattr(hf, "backend_tokenizer"):  # a slow (Python-only) tokenizer has no tokenizer.json
        raise ValueError(f"{type(hf).__name__} has no fast (tokenizers) backend to export")
    os.makedirs(out_dir, exist_ok=True)
    hf.save_pretrained(out_dir, save_jinja_files=False)
    hf.backend_tokenizer.save(os.path.join(out_dir, "tokenizer.json"))  # the exact backend state
    _write_json(os.path.join(out_dir, "special_tokens_map.json"), hf.special_tokens_map)
    eos = ([hf.eos_token_id] if hf.eos_token_id is not None else []) + extra
    # transformers skips the cleanup for BPE models unless forced (it corrupts their output).
    clean_up = bool(getattr(hf, "clean_up_tokenization_spaces", False)) and not (
        type(hf.backend_tokenizer.model).__name__ == "BPE"
        and not getattr(hf, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False)
    )
    _write_json(os.path.join(out_dir, PRISM_FILE), {
        "eos_token_ids": list(dict.fromkeys(int(i) for i in eos)),
        "clean_up_tokenization_spaces": clean_up,
    })


def _write_json(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2, ensure_ascii=False)
        f.write("\n")


def main(argv: list[str]) -> int:
    source, out_dir = argv
    try:
        export_tokenizer(source, out_dir)
    except Exception as e:  # transformers raises many types (OSError, ValueError, KeyError...)
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        print(ERROR_MARK + reason, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
