"""benchmarks/repeats_report.py on committed records of the six-model H100 runs: two repeats
and a simulated sweep side by side, the spread and the highest rate at the target."""
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUNS = ROOT / "benchmarks" / "results" / "h100-6models-2026-12-05"
SIM = ROOT / "benchmarks" / "results" / "sim-validation-h100-6models-2026-12-05"
TRACE = ROOT / "benchmarks" / "traces" / "alibaba-busiest-10min-timex0.05-6models-azureconv.jsonl"
sys.path.insert(0, str(ROOT / "benchmarks"))

import repeats_report  # noqa: E402


def test_repeats_and_simulation_side_by_side(tmp_path, capsys):
    sim = tmp_path / "sim"
    sim.mkdir()
    for path in SIM.glob("sim-requests-*-x*.jsonl.gz"):  # the simulated records, named as a sweep's
        (sim / path.name.removeprefix("sim-")).write_bytes(path.read_bytes())
    code = repeats_report.main([
        "--runs", f"r1={RUNS / 'r1' / 'records'}", f"r2={RUNS / 'r2' / 'records'}", "--sim", str(sim),
        "--config", str(ROOT / "examples" / "h100-6models.yaml"), "--trace", str(TRACE), "--out", str(tmp_path / "out")])
    assert code == 0
    result = json.loads((tmp_path / "out" / "repeats.json").read_text())
    prism = result["sustained"]["prism"]
    assert prism == {"r1": pytest.approx(132 / 29.5, rel=0.01), "r2": pytest.approx(112 / 29.5, rel=0.01),
                     "sim": pytest.approx(132 / 29.5, rel=0.01)}
    assert result["sustained"]["static"] == {"r1": None, "r2": None, "sim": None}  # small models' TPOT
    swap = result["points"]["r1"]["swap-x0.5"]
    assert 0.5 < swap["slo_attainment"] < 0.65 and swap["rate_rps"] > 2.7
    table = capsys.readouterr().out
    assert "| prism | 0.75 | 4.47 | 99.2% / 98.5% (0.8 pts) / 99.2%" in table
    assert (tmp_path / "out" / "attainment_vs_rate.png").stat().st_size > 5000
