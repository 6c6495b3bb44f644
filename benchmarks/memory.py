"""Elastic-memory costs on one device: page create/map/unmap/release, arena growth, copies.

    python3 benchmarks/memory.py                  # cuda:0
    python3 benchmarks/memory.py --device cpu     # host mmap backend

Per page (default 2 MiB): latency of create, map (+ set access), unmap (synchronize + unmap)
and release, median and p99 over --num-pages pages. Growth: time to map --grow-bytes into an
arena one page at a time vs one chunk, and to unmap it again. Copy: --copy-bytes from pinned
host memory into VMM-mapped memory vs into a plain torch.empty tensor (CUDA events), plus a
device-to-device copy out of VMM memory. Prints a table last; writes JSON (see --out).
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prism.memory import Arena, Owner, PagePool, make_backend  # noqa: E402

OWNER = Owner("bench", "kv")


def summary_us(seconds: list[float]) -> dict:
    ordered = sorted(seconds)
    p99 = ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]
    return {"median_us": statistics.median(ordered) * 1e6, "p99_us": p99 * 1e6, "n": len(ordered)}


def timed(fn, *args):
    start = time.perf_counter()
    result = fn(*args)
    return result, time.perf_counter() - start


def bench_page_ops(backend, num_pages: int) -> dict:
    """Each backend call alone, one page at a time, over num_pages pages."""
    size = num_pages * backend.page_size
    base = backend.reserve(size)
    times = {"create": [], "map": [], "unmap": [], "release": []}
    chunks = []
    for i in range(num_pages):
        chunk, t = timed(backend.create, 1)
        if chunk is None:
            raise SystemExit(f"device ran out of memory after {i} pages")
        times["create"].append(t)
        chunks.append(chunk)
        times["map"].append(timed(backend.map, base + i * backend.page_size, chunk)[1])
    for i, chunk in enumerate(chunks):
        times["unmap"].append(timed(backend.unmap, base + i * backend.page_size, 1)[1])
        times["release"].append(timed(backend.release, chunk)[1])
    backend.free_range(base, size)
    return {op: summary_us(t) for op, t in times.items()}


def device_free_bytes(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.mem_get_info(device)[0]


def bench_grow(backend, grow_bytes: int, repeats: int) -> dict:
    """Grow an arena by grow_bytes through the pool, one page at a time vs one chunk."""
    num_pages = grow_bytes // backend.page_size
    pool = PagePool(backend, num_pages, num_spare_pages=0)
    arena = Arena(pool, OWNER, grow_bytes)
    result = {}
    for name, chunk_pages in (("one_page_at_a_time", 1), ("one_chunk", num_pages)):
        maps, unmaps, drops = [], [], []
        for _ in range(repeats):
            free_before = device_free_bytes(backend.device)
            ok, t_map = timed(arena.map, 0, num_pages, chunk_pages)
            if not ok:
                raise SystemExit(f"could not map {grow_bytes} bytes")
            if free_before is not None:
                drops.append(free_before - device_free_bytes(backend.device))
            unmaps.append(timed(arena.unmap_all)[1])
            maps.append(t_map)
        result[name] = {
            "chunk_pages": chunk_pages,
            "map_s": statistics.median(maps),
            "unmap_s": statistics.median(unmaps),
            "map_s_all": maps,
            "device_free_drop_bytes": drops[0] if drops else None,
        }
    arena.close()
    pool.close()
    return result


def time_copies(dst: torch.Tensor, src: torch.Tensor, repeats: int) -> float:
    """Median seconds of dst.copy_(src) (CUDA events on a GPU, wall clock on the CPU)."""
    for _ in range(2):
        dst.copy_(src, non_blocking=True)
    times = []
    on_gpu = dst.device.type == "cuda" or src.device.type == "cuda"
    for _ in range(repeats):
        if on_gpu:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src, non_blocking=True)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            times.append(timed(dst.copy_, src)[1])
    return statistics.median(times)


def bench_copy(backend, num_bytes: int, repeats: int) -> dict:
    device = backend.device
    num_pages = num_bytes // backend.page_size
    pool = PagePool(backend, num_pages, num_spare_pages=0)
    arena = Arena(pool, OWNER, num_bytes)
    assert arena.map(0, num_pages, chunk_pages=num_pages)
    vmm = arena.tensor
    plain = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    host = torch.empty(num_bytes, dtype=torch.uint8, pin_memory=device.type == "cuda").fill_(3)
    gb = num_bytes / 1e9
    result = {
        "bytes": num_bytes,
        "host_pinned": device.type == "cuda",
        "host_to_vmm_GBps": gb / time_copies(vmm, host, repeats),
        "host_to_plain_GBps": gb / time_copies(plain, host, repeats),
    }
    if device.type == "cuda":
        # read + write bytes, as device copy bandwidth is usually quoted
        result["vmm_to_plain_device_GBps"] = 2 * gb / time_copies(plain, vmm, repeats)
        result["plain_to_plain_device_GBps"] = 2 * gb / time_copies(plain, plain.clone(), repeats)
    result["vmm_copy_correct"] = bool(torch.equal(vmm[:4096].cpu(), host[:4096]))
    del plain, host, vmm
    arena.close()
    pool.close()
    return result


def describe(backend) -> dict:
    info = {"torch_version": torch.__version__, "page_size": backend.page_size}
    if backend.device.type == "cuda":
        info["card"] = torch.cuda.get_device_name(backend.device)
        info["cuda_runtime"] = torch.version.cuda
        info["granularity"] = backend.granularity
        version = backend.driver_version()
        info["driver_cuda_version"] = f"{version // 1000}.{version % 1000 // 10}"
        info["nvidia_driver"] = nvidia_driver_version()
        try:
            from importlib.metadata import version as pkg_version

            info["cuda_bindings_version"] = pkg_version("cuda-bindings")
        except Exception:
            info["cuda_bindings_version"] = None
    else:
        info["card"] = cpu_name()
        info["kernel"] = platform.release()
    return info


def nvidia_driver_version() -> str | None:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20,
        )
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 else None
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return None


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return "cpu " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu " + (platform.processor() or platform.machine())


def print_table(result: dict) -> None:
    m = result["measurements"]
    print(f"\n{result['card']}  page {result['page_size'] >> 20} MiB  {result['date']}")
    print(f"{'per page':<34}{'median us':>12}{'p99 us':>12}")
    for op, s in m["page_ops"].items():
        print(f"  {op:<32}{s['median_us']:>12.1f}{s['p99_us']:>12.1f}")
    print(f"{'grow arena by ' + str(m['grow_bytes'] >> 20) + ' MiB':<34}{'map ms':>12}{'unmap ms':>12}")
    for name, g in m["grow"].items():
        print(f"  {name:<32}{g['map_s'] * 1e3:>12.2f}{g['unmap_s'] * 1e3:>12.2f}")
    c = m["copy"]
    print(f"copy {c['bytes'] >> 20} MiB{'':<24}{'GB/s':>12}")
    for key, value in c.items():
        if key.endswith("GBps"):
            print(f"  {key[:-5]:<32}{value:>12.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--page-size", type=int, default=2 << 20)
    parser.add_argument("--num-pages", type=int, default=500)
    parser.add_argument("--grow-bytes", type=int, default=1 << 30)
    parser.add_argument("--copy-bytes", type=int, default=1 << 30)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", help="JSON path (default benchmarks/results/memory-<card>-<date>.json)")
    args = parser.parse_args()

    if args.device.startswith("cuda"):
        torch.cuda.init()  # torch's primary context first; the backend retains the same one
    backend = make_backend(args.device, args.page_size)
    result = {
        "date": datetime.date.today().isoformat(),
        "command": "python3 " + " ".join(sys.argv),
        "device": args.device,
        **describe(backend),
    }
    result["measurements"] = {
        "page_ops": bench_page_ops(backend, args.num_pages),
        "grow_bytes": args.grow_bytes,
        "grow": bench_grow(backend, args.grow_bytes, args.repeats),
        "copy": bench_copy(backend, args.copy_bytes, max(args.repeats, 10)),
    }
    backend.close()
    slug = re.sub(r"[^a-z0-9]+", "-", result["card"].lower()).strip("-")
    out = Path(args.out or f"benchmarks/results/memory-{slug}-{result['date']}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    print_table(result)


if __name__ == "__main__":
    main()
