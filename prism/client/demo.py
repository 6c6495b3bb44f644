"""`prism demo`: start the CPU demo server, drive it through the official `openai` client with
a short scripted session (several models, streaming, an eviction and a reactivation, with
timings), then stop it (unless --keep-serving)."""
from __future__ import annotations

import importlib.util
import time
import urllib.request
from pathlib import Path

from prism import env
from prism.client.server_process import admin_state, free_port, start_server, stop_server, wait_healthy
from prism.errors import UserError

# Package data, so that `prism demo` works from an installed package too (examples/ links to it).
DEFAULT_CONFIG = Path(__file__).resolve().parent / "configs" / "cpu-demo.yaml"
QUESTION = "What is the capital of France? Answer in one sentence."


def residency(base: str) -> str:
    state = admin_state(base)
    rows = []
    for device, rep in state["devices"].items():
        mib = rep["page_size"] / 2**20
        models = ", ".join(
            f"{m} {'resident' if st['resident'] else 'evicted'} "
            f"({st['weight_pages'] * mib:.0f}+{st['kv_pages'] * mib:.0f} MiB)"
            for m, st in rep["models"].items()
        )
        rows.append(f"  {device}: free {rep['free_pages'] * mib:.0f} MiB | {models}")
    return "\n".join(rows)


def chat(client, model: str, question: str, max_tokens: int = 48) -> str:
    """Stream one chat answer, printing tokens as they come, then its timings."""
    start = time.perf_counter()
    first = None
    pieces = []
    print(f"\n[{model}] > {question}\n[{model}] ", end="", flush=True)
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], max_tokens=max_tokens,
        temperature=0, stream=True, stream_options={"include_usage": True},
    )
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text = choice.delta.content or ""
            if text and first is None:
                first = time.perf_counter()
            pieces.append(text)
            print(text, end="", flush=True)
    total = time.perf_counter() - start
    n = usage.completion_tokens if usage else len(pieces)
    ttft = (first or time.perf_counter()) - start
    rate = (n - 1) / max(total - ttft, 1e-9) if n > 1 else 0.0
    print(f"\n[{model}] TTFT {ttft * 1e3:.0f} ms, {n} tokens, {rate:.1f} tokens/s after the first")
    return "".join(pieces)


def run_session(base: str) -> None:
    import openai

    client = openai.OpenAI(base_url=f"{base}/v1", api_key=env.api_key() or "none")
    print("models:", ", ".join(m.id for m in client.models.list().data))
    print("memory at start:\n" + residency(base))

    first = chat(client, "smollm2", QUESTION)
    t0 = time.perf_counter()
    out = client.completions.create(model="tiny", prompt=[1, 2, 3, 4], max_tokens=8, temperature=0)
    print(f"\n[tiny] completion of 4 token ids: {len(out.choices[0].text)} chars, "
          f"{out.usage.completion_tokens} tokens in {(time.perf_counter() - t0) * 1e3:.0f} ms")

    time.sleep(1.5)  # let smollm2 become idle long enough to be swapped out
    print("\nasking smollm2-copy: only one SmolLM2 fits, so the idle one is evicted first")
    chat(client, "smollm2-copy", "Name three primary colors.")
    print("memory now:\n" + residency(base))

    time.sleep(1.5)
    print("\nasking smollm2 again: it is reactivated from its host copy")
    again = chat(client, "smollm2", QUESTION)
    print("memory now:\n" + residency(base))
    print(f"\nsame greedy answer before eviction and after reactivation: {again == first}")
    for line in _metrics_summary(base):
        print(line)


def _metrics_summary(base: str) -> list[str]:
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"{base}/metrics", timeout=5) as r:
        families = {f.name: f for f in text_string_to_metric_families(r.read().decode())}
    lines = ["\nfrom /metrics:"]
    for name in ("prism_activations", "prism_evictions"):
        for s in families[name].samples:
            if s.value and s.name.endswith("_total"):
                lines.append(f"  {name} {s.labels['model']}: {s.value:.0f}")
    for s in families["prism_slo_attainment"].samples:
        lines.append(f"  SLO attainment {s.labels['model']} {s.labels['slo']}: {s.value:.0%}")
    return lines


def demo(config: str | None = None, keep_serving: bool = False, port: int | None = None) -> int:
    if importlib.util.find_spec("openai") is None:  # an extra: say so before starting anything
        raise UserError("prism demo drives the server with the openai package: pip install 'prism[demo]'")
    config = config or str(DEFAULT_CONFIG)
    port = port or free_port()
    base = f"http://127.0.0.1:{port}"
    print(f"starting: prism serve --config {config} --port {port}", flush=True)
    t0 = time.perf_counter()
    proc = start_server(config, port)
    try:
        wait_healthy(base, proc)
        print(f"server ready in {time.perf_counter() - t0:.1f} s", flush=True)
        run_session(base)
        if keep_serving:
            print(f"\nstill serving on {base}/v1 (Ctrl-C to stop)", flush=True)
            proc.wait()
    except KeyboardInterrupt:
        pass
    finally:
        stop_server(proc)
    print("server stopped", flush=True)
    return 0
