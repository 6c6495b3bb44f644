"""`prism tokenizer`: write a model's tokenizer as a Hugging Face tokenizer folder, for clients
that tokenize themselves (count tokens, render the chat template) against a Prism server."""
from __future__ import annotations

import sys

from prism.errors import UserError


def add_tokenizer_parser(sub) -> None:
    p = sub.add_parser("tokenizer", help="export a model's tokenizer as a Hugging Face tokenizer folder")
    p.add_argument("--model", required=True, help="catalog name, HF folder or .gguf file")
    p.add_argument("--out", required=True, help="folder to write (tokenizer.json, tokenizer_config.json...)")
    p.set_defaults(func=run_tokenizer)


def run_tokenizer(args) -> int:
    from prism.engine.catalog import resolve_model
    from prism.engine.tokenizer import TokenizerLoadError
    from prism.engine.tokenizer_export import export_tokenizer

    source = resolve_model(args.model)
    if source.tokenizer_path is None:
        raise UserError(f"model {args.model} has no tokenizer")
    try:
        export_tokenizer(source.tokenizer_path, args.out)
    except Exception as e:  # transformers raises many types; all mean the files are unreadable
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise TokenizerLoadError(f"cannot export tokenizer from {source.tokenizer_path}: {reason}") from None
    print(f"wrote {args.model}'s tokenizer to {args.out}", file=sys.stderr)
    return 0
