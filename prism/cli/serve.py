"""`prism generate`, `prism serve` and `prism demo`."""
from __future__ import annotations

import sys
import time

from prism.cli.common import default_memory, size_arg
from prism.errors import UserError


def add_generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="complete one prompt and print the text")
    p.add_argument("--model", required=True,
                   help="catalog name (e.g. smollm2-135m, llama-3.2-1b:random), HF folder, .gguf file or config.json")
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--device", default="cpu", help="cpu or cuda:N")
    p.add_argument("--memory", type=size_arg, default=None,
                   help="device page budget (default: 4GiB on CPU, 90%% of free GPU memory)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    p.set_defaults(func=run_generate)


def run_generate(args) -> int:
    import torch

    from prism.config import DeviceConfig
    from prism.engine.llm_engine import LLMEngine
    from prism.types import SamplingParams

    params = SamplingParams(
        temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
        max_tokens=args.max_tokens, stop=tuple(args.stop), ignore_eos=args.ignore_eos,
    )
    device = DeviceConfig(device=args.device, memory_bytes=args.memory or default_memory(args.device))
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    engine = LLMEngine(args.model, device_config=device, dtype=dtype, show_progress=True)
    try:
        prompt = args.prompt
        if args.chat:
            if engine.tokenizer is None:
                raise UserError(f"model {args.model} has no tokenizer, so no chat template")
            prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        start = time.perf_counter()
        out = engine.generate([prompt], params)[0]
        elapsed = time.perf_counter() - start
    finally:
        engine.close()
    sys.stdout.write(out.text + "\n")
    sys.stdout.flush()
    n = len(out.token_ids)
    print(f"{n} tokens in {elapsed:.2f} s: {n / elapsed:.1f} tokens/s "
          f"(finish: {out.finish_reason.value})", file=sys.stderr)
    return 0


def add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="run the OpenAI-compatible multi-model server")
    p.add_argument("--config", required=True, help="YAML file: models, devices, scheduler (see examples/)")
    p.add_argument("--host", default=None, help="default 127.0.0.1 (or the config's server.host)")
    p.add_argument("--port", type=int, default=None, help="default 8000 (or the config's server.port)")
    p.add_argument("--api-key", default=None, help="require this bearer key (or set PRISM_API_KEY)")
    p.add_argument("--ray", nargs="?", const="", default=None, metavar="ADDRESS",
                   help="run the device workers as Ray actors on a Ray cluster's nodes (docs/cluster.md): "
                        "ADDRESS (host:port or auto) joins one; without it, the config's ray.address, "
                        "else Ray's default (RAY_ADDRESS, the cluster `ray start` ran here, else a new local one)")
    p.set_defaults(func=lambda a: _serve(a))


def _serve(args) -> int:
    from prism.server.serve import serve

    return serve(args.config, args.host, args.port, args.api_key, ray_address=args.ray)


def add_demo_parser(sub) -> None:
    p = sub.add_parser("demo", help="start the CPU demo server and drive it with a scripted session")
    p.add_argument("--config", default=None, help="default: the packaged cpu-demo.yaml (examples/cpu-demo.yaml)")
    p.add_argument("--port", type=int, default=None, help="default: a free port")
    p.add_argument("--keep-serving", action="store_true", help="keep the server up after the session")
    p.set_defaults(func=lambda a: _demo(a))


def _demo(args) -> int:
    from prism.client.demo import demo

    return demo(args.config, args.keep_serving, args.port)
