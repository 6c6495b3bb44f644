"""The engine's projections at 1-512 rows on real model shapes: cuBLAS (F.linear) and the Triton
GEMM (prism/kernels/gemm.py) over its config space, each against its roofline.

For the qkv, o, gate_up and down weights of Llama-3.2-1B, Llama-3.1-8B and Qwen2.5-7B and each
row count M, on the GPU of this run:
- the ceilings, measured here: device-to-device copy bandwidth (bytes read + written) and a
  large bf16 matmul's rate; a GEMM's floor is max(bytes / bandwidth, flops / matmul rate),
  bytes = x + weight + output (+ bias, + residual read), each moved once;
- cuBLAS time, and each Triton config's, after checking that config's output (written into a
  NaN-poisoned buffer) against a float32 reference on fresh random inputs: a config off by
  more than bf16 rounding is reported and skipped;
- for o and down (their outputs are added to the residual stream): cuBLAS + a separate add,
  cuBLAS addmm (the residual as C, beta 1) and Triton with the residual in its epilogue; and
  the engine's layer boundary as it is (F.linear, then add_rms_norm) against the fused one
  (the Triton epilogue, then rms_norm), with the best config of that case.
Times are medians of triton.testing.do_bench (L2 flushed before every run, as a decode step's
weights are not in L2 either). Prints one table per model; writes JSON with card, date, command.

    python3 benchmarks/gemm_shapes.py            # about 4 minutes on one H100/H200
    python3 benchmarks/gemm_shapes.py --quick    # fewer configs, under 2 minutes
    python3 benchmarks/gemm_shapes.py --smoke    # tiny shapes; on CPU through the Triton interpreter (CI)
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch.nn.functional as F  # noqa: E402
from triton.compiler.errors import CompilationError  # noqa: E402
from triton.runtime.errors import OutOfResources  # noqa: E402

from prism.config import ModelConfig  # noqa: E402
from prism.kernels.gemm import GemmConfig, default_config, linear, num_sms  # noqa: E402

MODELS = ("llama-3.2-1b", "llama-3.1-8b", "qwen2.5-7b")
ROWS = (1, 8, 16, 64, 128, 256, 512)
RESIDUAL_LAYERS = ("o", "down")
# Tile shapes (block_m, block_n, block_k, warps, stages) tried per row class; split-K values
# are tried on top (one compiled kernel serves every split > 1). The quick run keeps the first two.
TILES = {
    16: [(16, 64, 128, 4, 4), (16, 64, 256, 4, 3), (16, 128, 128, 4, 4), (16, 32, 256, 4, 4),
         (16, 128, 256, 8, 3)],
    64: [(64, 64, 128, 4, 4), (32, 64, 128, 4, 4), (64, 128, 64, 4, 4), (64, 128, 128, 8, 3)],
    512: [(64, 128, 64, 4, 4), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (64, 256, 64, 8, 3),
          (128, 64, 64, 4, 4)],
}
SPLITS = (1, 2, 4, 8)
REL_TOL = 1e-2  # bf16 output rounding is ~4e-3 relative; a wrong tile is far beyond


@dataclass(frozen=True)
class Layer:
    model: str
    name: str
    n: int
    k: int
    bias: bool = False


def model_layers(name: str) -> list[Layer]:
    """The four projections of one decoder layer, as the engine fuses them (qkv, gate_up)."""
    c = ModelConfig.from_json(REPO / "prism" / "models" / "configs" / f"{name}.json")
    return [
        Layer(name, "qkv", c.q_size + 2 * c.kv_size, c.hidden_size, c.attention_bias),
        Layer(name, "o", c.hidden_size, c.q_size, c.attention_out_bias),
        Layer(name, "gate_up", 2 * c.intermediate_size, c.hidden_size),
        Layer(name, "down", c.hidden_size, c.intermediate_size),
    ]


def config_space(m: int, n: int, k: int, sms: int, num_tile_shapes: int | None = None) -> list[GemmConfig]:
    """Configs worth timing for m rows: the default, and the (first `num_tile_shapes`) tile
    shapes of m's class, each with the split-K values that leave every piece at least two
    K tiles and launch at most four waves."""
    row_class = min(c for c in TILES if m <= c) if m <= max(TILES) else max(TILES)
    tiles = TILES[row_class][:num_tile_shapes]
    found = []
    for bm, bn, bk, warps, stages in tiles:
        num_tiles = -(-m // bm) * -(-n // bn)
        k_tiles = -(-k // bk)
        for split in SPLITS:
            if split == 1 or (k_tiles // split >= 2 and num_tiles * split <= 4 * sms):
                found.append(GemmConfig(bm, bn, bk, split, warps, stages))
    auto = default_config(m, n, k, sms)
    return found if auto in found else [auto, *found]


# ---- timing and ceilings ---------------------------------------------------------------
def time_us(fn, device: torch.device, budget_ms: float) -> float:
    """Median time of fn in microseconds: CUDA events through do_bench on a GPU (L2 flushed
    before each run), the host clock on CPU (smoke runs only)."""
    if device.type == "cuda":
        import triton.testing

        return 1e3 * triton.testing.do_bench(fn, warmup=budget_ms / 4, rep=budget_ms, return_mode="median")
    t0 = time.perf_counter()
    fn()
    return 1e6 * (time.perf_counter() - t0)


def measure_ceilings(device: torch.device, smoke: bool) -> dict:
    """Device-to-device copy bandwidth (bytes read + written) and a dense bf16 matmul rate."""
    elems = (1 << 20) if smoke else (1 << 29)  # 1 GiB of bf16
    src = torch.randn(elems, device=device).to(torch.bfloat16)
    dst = torch.empty_like(src)
    copy_us = time_us(lambda: dst.copy_(src), device, 200)
    n = 256 if smoke else 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    mm_us = time_us(lambda: torch.matmul(a, b), device, 300)
    return dict(copy_bytes_per_s=2 * elems * 2 / (copy_us * 1e-6), matmul_flops_per_s=2 * n**3 / (mm_us * 1e-6))


def floor_us(m: int, layer: Layer, ceilings: dict, residual: bool, elem: int) -> float:
    moved = elem * (m * layer.k + layer.n * layer.k + m * layer.n * (2 if residual else 1) + layer.n * layer.bias)
    flops = 2 * m * layer.n * layer.k
    return 1e6 * max(moved / ceilings["copy_bytes_per_s"], flops / ceilings["matmul_flops_per_s"])


# ---- one case: one layer at one row count --------------------------------------------------
def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


def check(fn, x, w, bias, residual) -> tuple[float, float]:
    """(relative error, max abs error) of fn(x, w, bias, residual, out) on these fresh inputs,
    out poisoned with NaN so an unwritten element fails."""
    ref = F.linear(x.float(), w.float(), None if bias is None else bias.float())
    if residual is not None:
        ref = ref.to(x.dtype).float() + residual.float()
    out = torch.full(ref.shape, float("nan"), dtype=x.dtype, device=x.device)
    fn(x, w, bias, residual, out)
    bad = (out.float() - ref).abs().max().item()
    return (rel_err(out, ref) if torch.isfinite(out).all() else float("inf")), bad


def fresh_inputs(m: int, layer: Layer, w: torch.Tensor, seed: int):
    gen = torch.Generator(device=w.device).manual_seed(seed)
    x = torch.randn(m, layer.k, device=w.device, generator=gen).to(w.dtype)
    residual = torch.randn(m, layer.n, device=w.device, generator=gen).to(w.dtype)
    return x, residual


def run_case(m: int, layer: Layer, w: torch.Tensor, bias, ceilings: dict, sms: int, args, seed: int) -> dict:
    device = w.device
    x, residual = fresh_inputs(m, layer, w, seed)
    cublas_err = check(lambda x, w, b, r, out: out.copy_(F.linear(x, w, b)), x, w, bias, None)
    cublas_us = time_us(lambda: F.linear(x, w, bias), device, args.budget_ms)
    tried = []
    space = config_space(m, layer.n, layer.k, sms, 2 if args.quick else None)
    for config in space[:2] if args.smoke else space:
        # fresh inputs for every config's check, then time it on the case's inputs
        cx, _ = fresh_inputs(m, layer, w, seed + 1 + len(tried))
        try:
            err, max_abs = check(lambda x, w, b, r, out, c=config: linear(x, w, r, c, bias=b, out=out), cx, w, bias, None)
        except (OutOfResources, CompilationError) as e:  # a tile too large for this card
            tried.append(dict(config=str(config), error=f"{type(e).__name__}: {e}"[:200]))
            continue
        entry = dict(config=str(config), rel_err=err, max_abs_err=max_abs)
        if err <= REL_TOL:
            entry["us"] = time_us(lambda c=config: linear(x, w, None, c, bias=bias), device, args.budget_ms)
        tried.append(entry)
    timed = [t for t in tried if "us" in t]
    best = min(timed, key=lambda t: t["us"]) if timed else None
    floor = floor_us(m, layer, ceilings, residual=False, elem=w.element_size())
    case = dict(
        model=layer.model, layer=layer.name, n=layer.n, k=layer.k, m=m, bias=layer.bias, floor_us=floor,
        cublas_us=cublas_us, cublas_rel_err=cublas_err[0], cublas_max_abs_err=cublas_err[1],
        best_config=best["config"] if best else None, best_us=best["us"] if best else None,
        best_max_abs_err=best["max_abs_err"] if best else None,
        max_rel_err=max((t["rel_err"] for t in timed), default=None),
        failed=[t for t in tried if "us" not in t], configs=tried, residual=None,
    )
    if best and layer.name in RESIDUAL_LAYERS:
        case["residual"] = residual_case(m, layer, w, bias, x, residual, GemmConfig.parse(best["config"]), ceilings, args)
    return case


def residual_case(m, layer, w, bias, x, residual, config, ceilings, args) -> dict:
    """h + x @ w.T three ways (the residual not updated in place, so every run sees the same
    h), and the engine's layer boundary two ways: today F.linear then add_rms_norm (the add
    already fused into the norm), fused the GEMM's epilogue then rms_norm."""
    from prism.kernels.fused_ops import add_rms_norm, rms_norm

    device = w.device
    err, _ = check(lambda x, w, b, r, out: linear(x, w, r, config, bias=b, out=out), x, w, bias, residual)
    separate_us = time_us(lambda: torch.add(residual, F.linear(x, w, bias)), device, args.budget_ms)
    addmm_us = time_us(lambda: torch.addmm(residual, x, w.t()) if bias is None
                       else torch.addmm(residual + bias, x, w.t()), device, args.budget_ms)
    fused_us = time_us(lambda: linear(x, w, residual, config, bias=bias), device, args.budget_ms)
    h = residual.clone()  # the engine paths update it in place
    norm = torch.ones(layer.n, dtype=w.dtype, device=device)
    engine_now_us = time_us(lambda: add_rms_norm(F.linear(x, w, bias), h, norm, 1e-6), device, args.budget_ms)
    engine_fused_us = time_us(lambda: rms_norm(linear(x, w, h, config, bias=bias, out=h), norm, 1e-6),
                              device, args.budget_ms)
    return dict(config=str(config), rel_err=err, cublas_add_us=separate_us, cublas_addmm_us=addmm_us,
                triton_fused_us=fused_us, saved_us=separate_us - fused_us,
                engine_now_us=engine_now_us, engine_fused_us=engine_fused_us,
                floor_us=floor_us(m, layer, ceilings, residual=True, elem=w.element_size()))


# ---- the run -------------------------------------------------------------------------------
def smoke_layers() -> list[Layer]:
    c = ModelConfig.from_json(REPO / "prism" / "models" / "configs" / "tiny-qwen2.json")
    return [Layer("tiny-qwen2", "qkv", c.q_size + 2 * c.kv_size, c.hidden_size, c.attention_bias),
            Layer("tiny-qwen2", "down", c.hidden_size, c.intermediate_size)]


def print_table(model: str, cases: list[dict], ceilings: dict) -> None:
    print(f"\n{model}: time in us (x = over its floor); floor = max(bytes / "
          f"{ceilings['copy_bytes_per_s'] / 1e12:.2f} TB/s, flops / {ceilings['matmul_flops_per_s'] / 1e12:.0f} TFLOP/s)")
    print(f"{'M':>4} {'layer':<8}{'N x K':>12} {'floor':>7} {'cuBLAS':>14} {'Triton':>14}  {'config':<18} max|err|")
    for c in cases:
        fl = c["floor_us"]
        triton_cell = f"{c['best_us']:7.1f} ({c['best_us'] / fl:4.2f})" if c["best_us"] else f"{'-':>14}"
        print(f"{c['m']:>4} {c['layer']:<8}{c['n']:>6}x{c['k']:<5} {fl:7.1f} "
              f"{c['cublas_us']:7.1f} ({c['cublas_us'] / fl:4.2f}) {triton_cell}  {c['best_config'] or '-':<18} "
              f"{c['best_max_abs_err'] if c['best_config'] else float('nan'):.1e}")
    for m in sorted({c["m"] for c in cases}):
        at_m = [c for c in cases if c["m"] == m]
        cublas = sum(c["cublas_us"] for c in at_m)
        best = sum(min(c["cublas_us"], c["best_us"] or c["cublas_us"]) for c in at_m)
        floor = sum(c["floor_us"] for c in at_m)
        print(f"{m:>4} sum of layers: floor {floor:7.1f}  cuBLAS {cublas:7.1f} ({cublas / floor:4.2f})  "
              f"best of both {best:7.1f} ({best / floor:4.2f})")
    with_res = [c for c in cases if c["residual"]]
    if with_res:
        print(f"{model}, residual added (h + x @ w.T), us: separately (cuBLAS + add), cuBLAS addmm, Triton epilogue;"
              f"\n  engine boundary: now = F.linear + add_rms_norm, fused = Triton epilogue + rms_norm")
        print(f"{'M':>4} {'layer':<8}{'floor':>7} {'cuBLAS+add':>11} {'addmm':>7} {'Triton':>7} {'saved':>6}"
              f" {'now':>7} {'fused':>7} {'saved':>6}")
        for c in with_res:
            r = c["residual"]
            print(f"{c['m']:>4} {c['layer']:<8}{r['floor_us']:7.1f} {r['cublas_add_us']:11.1f} {r['cublas_addmm_us']:7.1f}"
                  f" {r['triton_fused_us']:7.1f} {r['saved_us']:6.1f} {r['engine_now_us']:7.1f}"
                  f" {r['engine_fused_us']:7.1f} {r['engine_now_us'] - r['engine_fused_us']:6.1f}")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="two tile shapes per row class (under ~2 minutes)")
    p.add_argument("--smoke", action="store_true", help="tiny shapes (CPU: Triton interpreter): checks that it runs")
    p.add_argument("--models", nargs="+", default=list(MODELS))
    p.add_argument("--rows", nargs="+", type=int, default=list(ROWS))
    p.add_argument("--budget-ms", type=float, default=None, help="do_bench repeat time per measurement")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/gemm-shapes-<card>-<date>.json)")
    args = p.parse_args(argv)
    if args.budget_ms is None:
        args.budget_ms = 2.0 if args.smoke else 10.0 if args.quick else 20.0
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # bf16 on the GPU; the smoke run in float32, as the interpreter's bf16 arithmetic is
    # unreliable in prism's norm kernels (the GEMM's own bf16 path is in tests/kernels/test_gemm.py)
    dtype = torch.float32 if args.smoke else torch.bfloat16
    if device.type == "cpu" and not args.smoke:
        raise SystemExit("no CUDA device: run with --smoke for the CPU check")
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    memory = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    ceilings = measure_ceilings(device, args.smoke)
    sms = num_sms(device)
    groups = {"tiny-qwen2": smoke_layers()} if args.smoke else {m: model_layers(m) for m in args.models}
    rows = [1, 20] if args.smoke else args.rows
    all_cases = []
    for model, layers in groups.items():
        cases = []
        for i, layer in enumerate(layers):
            gen = torch.Generator(device=device).manual_seed(i)
            w = (torch.randn(layer.n, layer.k, device=device, generator=gen) * layer.k ** -0.5).to(dtype)
            bias = torch.randn(layer.n, device=device, generator=gen).to(dtype) if layer.bias else None
            for m in rows:
                cases.append(run_case(m, layer, w, bias, ceilings, sms, args, seed=1000 * i + m))
            del w, bias
        cases.sort(key=lambda c: (c["m"], [lay.name for lay in layers].index(c["layer"])))
        print_table(model, cases, ceilings)
        all_cases += cases
    failed = sum(len(c["failed"]) for c in all_cases)
    print(f"\n{len(all_cases)} cases, {failed} configs failed their check, {time.perf_counter() - started:.0f} s")
    result = dict(
        card=card, memory_bytes=memory, sms=sms, date=datetime.date.today().isoformat(),
        command="python3 benchmarks/gemm_shapes.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        torch=torch.__version__, triton=__import__("triton").__version__, dtype=str(dtype),
        ceilings=ceilings, seconds=time.perf_counter() - started, cases=all_cases,
    )
    out = Path(args.out) if args.out else (
        REPO / "benchmarks" / "results" / f"gemm-shapes-{card.lower().replace(' ', '-')}-{result['date']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
