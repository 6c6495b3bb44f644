"""Behaviour check for structural changes: the simulator's per-request records on the committed
E1 and E2 inputs, every system, before and after a change.

    python benchmarks/sim_records_check.py run OUT_DIR       # simulate every case, keep the records
    python benchmarks/sim_records_check.py compare DIR_A DIR_B

`run` drives `prism simulate` through its command line only (the interface a refactoring must
keep), so the same script runs on both sides of a change. `compare` says for every records file
whether it is identical byte for byte, identical once sorted (only the order of simultaneous
events moved), or different (with the first differing record). Exit code 1 if any differ.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
INPUTS = ROOT / "benchmarks" / "sim-inputs"
PROFILES = ROOT / "benchmarks" / "profiles"
SYSTEMS = "prism,static,muxserve,swap,dedicated"

# (case, inputs tag, profiles, number of GPUs or None to keep the config's, rate scales)
CASES = [
    ("e1", "e1", "nvidia-h100", None, "1,4"),
    ("e1-host", "e1-host", "nvidia-h100-host", None, "1,4"),
    ("e2-4gpus", "e2", "nvidia-h100", 4, "1"),
    ("e2-host-6gpus", "e2-host", "nvidia-h100-host", 6, "1"),
]


def config_with_gpus(config: Path, num_gpus: int | None, folder: Path) -> Path:
    if num_gpus is None:
        return config
    raw = yaml.safe_load(config.read_text())
    memory = raw["devices"][0]["memory"]
    raw["devices"] = [{"device": f"cuda:{i}", "memory": memory} for i in range(num_gpus)]
    path = folder / f"{config.stem}-{num_gpus}gpus.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        for name, tag, profiles, gpus, scales in CASES:
            config = config_with_gpus(INPUTS / f"{tag}-config.yaml", gpus, Path(tmp))
            cmd = [sys.executable, "-m", "prism.cli", "simulate", "--config", str(config),
                   "--trace", str(INPUTS / f"{tag}-trace.jsonl"), "--policy", SYSTEMS,
                   "--rate-scales", scales, "--profiles", str(PROFILES / profiles),
                   "--out", str(out / name)]
            print("$", " ".join(cmd[2:]), flush=True)
            subprocess.run(cmd, check=False, cwd=ROOT, stdout=subprocess.DEVNULL)


def compare(a: Path, b: Path) -> int:
    files = sorted(p.relative_to(a) for p in a.rglob("requests-*.jsonl"))
    if not files:
        print(f"{a}: no records")
        return 1
    differ = 0
    for rel in files:
        left, right = (a / rel).read_bytes(), (b / rel).read_bytes() if (b / rel).exists() else None
        if right is None:
            verdict = "missing"
        elif left == right:
            verdict = "identical"
        elif sorted(left.splitlines()) == sorted(right.splitlines()):
            verdict = "identical sorted (order of simultaneous events moved)"
        else:
            verdict = "DIFFERENT: " + first_difference(left, right)
        differ += verdict.startswith(("DIFF", "missing"))
        print(f"{rel}: {len(left.splitlines())} records, {verdict}")
    print(f"{len(files) - differ} of {len(files)} records files match")
    return 1 if differ else 0


def first_difference(left: bytes, right: bytes) -> str:
    for i, (x, y) in enumerate(zip(left.splitlines(), right.splitlines())):
        if x != y:
            return f"line {i + 1}: {x[:160]!r} vs {y[:160]!r}"
    return f"{len(left.splitlines())} vs {len(right.splitlines())} lines"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("run").add_argument("out", type=Path)
    c = sub.add_parser("compare")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    args = p.parse_args()
    if args.cmd == "run":
        run(args.out)
        return 0
    return compare(args.a, args.b)


if __name__ == "__main__":
    sys.exit(main())
