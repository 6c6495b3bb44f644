"""benchmarks/sim_validation.py on records of a real CPU server run (committed): the simulator
is compared point by point, and agrees where a CPU server can be expected to."""
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RUN = ROOT / "benchmarks" / "results" / "sim-validation-cpu-2026-11-25"
SWEEP = ROOT / "benchmarks" / "results" / "cpu-sweep-2026-11-25"
sys.path.insert(0, str(ROOT / "benchmarks"))

import sim_validation  # noqa: E402


def test_real_and_simulated_agree_on_a_cpu_server_run(tmp_path, capsys):
    real = tmp_path / "real"
    real.mkdir()
    for name in ("requests-prism-x1.jsonl", "requests-static-x2.jsonl", "requests-prism-x2.jsonl"):
        shutil.copy(RUN / "real" / f"{name}.gz", real)  # archived records are stored gzipped
    out = tmp_path / "out"
    code = sim_validation.main([
        "--real", str(real), "--config", str(SWEEP / "config.yaml"), "--trace", str(SWEEP / "trace.jsonl"),
        "--profiles", str(ROOT / "benchmarks" / "profiles" / "cpu-dev"),
        "--calibrate-host", str(RUN / "solo" / "requests-prism-x1.jsonl.gz"), "--out", str(out), "--jobs", "1"])
    assert code == 0
    report = json.loads((out / "validation.json").read_text())
    rows = {(r["system"], r["scale"]): r["metrics"] for r in report["rows"]}
    assert set(rows) == {("prism", 1.0), ("static", 2.0), ("prism", 2.0)}
    for metrics in rows.values():
        assert abs(metrics["ttft_att"]["sim"] - metrics["ttft_att"]["real"]) <= 0.05
        assert abs(metrics["tpot_att"]["sim"] - metrics["tpot_att"]["real"]) <= 0.05
    assert abs(rows[("prism", 1.0)]["ttft_p50"]["rel_err"]) < 1.0  # host overheads in: same ballpark
    assert report["same_order"]["ttft_att"] == {"2.0": True}  # (JSON keys)
    assert (out / "ttft-static-x2.png").stat().st_size > 5000 and (out / "host.yaml").is_file()
    assert "Same order of systems" in capsys.readouterr().out


def test_bad_input_is_one_line(tmp_path, capsys):
    code = sim_validation.main(["--real", str(tmp_path), "--config", str(SWEEP / "config.yaml"),
                                "--trace", str(SWEEP / "trace.jsonl"), "--out", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("sim_validation: error: ") and err.count("\n") == 1
