"""Report math checked by hand on request records with known times."""
import json

import numpy as np
import pytest

from prism.bench.records import RequestRecord, load_records, save_records
from prism.cli import main
from prism.cluster.config import slos_from_config
from prism.bench.report import (
    SLOTargets, markdown_table, records_duration, slos_from_solo, summarize,
    throughput_over_time, write_report,
)

SLOS = {"a": SLOTargets(ttft_s=1.0, tpot_s=0.25), "b": SLOTargets(ttft_s=0.5, tpot_s=0.5)}


def rec(index, model, send, tokens, finish=None, reason="length", error=None, n=None):
    return RequestRecord(index, model, input_len=8, output_len=len(tokens) or 4, arrival_s=send, send_s=send,
                         token_s=list(tokens), finish_s=finish, finish_reason=reason, error=error,
                         num_output_tokens=n if n is not None else (len(tokens) if reason else None))


def hand_records():
    """Times chosen exact in binary. Per request: TTFT, TPOT, end-to-end."""
    return [
        rec(0, "a", 1.0, [1.5, 1.75, 2.0], finish=2.0),  # .5, .25, 1.0: meets both
        rec(1, "a", 2.0, [4.0, 4.125], finish=4.125),  # 2.0 (miss), .125, 2.125
        rec(2, "a", 3.0, [3.25, 3.75, 4.25, 4.75], finish=4.75),  # .25, .5 (miss), 1.75
        rec(3, "a", 4.0, [], finish=4.5, reason=None, error="APIError: boom"),  # failed: misses both
        rec(4, "a", 5.0, [5.5], finish=None, reason=None),  # unfinished: misses both
        rec(5, "b", 0.0, [0.25], finish=0.25),  # .25, no TPOT (one token), .25: meets both
        rec(6, "b", 10.0, [10.5, 11.0, 11.5], finish=11.5),  # .5, .5, 1.5: meets both (<=)
    ]


def test_attainment_goodput_and_counts_by_hand():
    s = summarize(hand_records(), SLOS, duration_s=20.0)
    a, b, o = s["a"], s["b"], s["overall"]
    assert (a["requests"], a["finished"], a["errors"]) == (5, 3, 1)
    assert a["ttft_attainment"] == pytest.approx(2 / 5)  # r0, r2
    assert a["tpot_attainment"] == pytest.approx(2 / 5)  # r0, r1
    assert a["slo_attainment"] == pytest.approx(1 / 5)  # r0
    assert a["goodput_rps"] == pytest.approx(1 / 20)
    assert a["throughput_rps"] == pytest.approx(3 / 20)
    assert a["output_tokens_per_s"] == pytest.approx(9 / 20)
    assert (b["ttft_attainment"], b["tpot_attainment"], b["slo_attainment"]) == (1.0, 1.0, 1.0)
    assert b["goodput_rps"] == pytest.approx(2 / 20)
    assert (o["requests"], o["finished"], o["errors"]) == (7, 5, 1)
    assert o["ttft_attainment"] == pytest.approx(4 / 7)
    assert o["tpot_attainment"] == pytest.approx(4 / 7)
    assert o["slo_attainment"] == pytest.approx(3 / 7)
    assert o["goodput_rps"] == pytest.approx(3 / 20)
    assert o["output_tokens_per_s"] == pytest.approx(13 / 20)
    assert a["slo"] == {"ttft_s": 1.0, "tpot_s": 0.25}


def test_latency_percentiles_by_hand():
    s = summarize(hand_records(), SLOS, duration_s=20.0)
    ttft_a = [0.5, 2.0, 0.25]  # finished requests only
    for q in (50, 90, 99):
        assert s["a"]["ttft_s"][f"p{q}"] == pytest.approx(np.percentile(ttft_a, q))
        assert s["a"]["tpot_s"][f"p{q}"] == pytest.approx(np.percentile([0.25, 0.125, 0.5], q))
        assert s["a"]["e2e_s"][f"p{q}"] == pytest.approx(np.percentile([1.0, 2.125, 1.75], q))
    assert s["a"]["ttft_s"]["p50"] == 0.5
    assert s["b"]["tpot_s"] == {"p50": 0.5, "p90": 0.5, "p99": 0.5}  # one request has a TPOT
    assert s["overall"]["e2e_s"]["p50"] == 1.5  # of .25, 1.0, 1.5, 1.75, 2.125


def test_percentiles_of_ten_known_values():
    ttfts = [0.1 * k for k in range(1, 11)]  # 0.1 .. 1.0, shuffled below
    order = [3, 7, 0, 9, 5, 1, 8, 2, 6, 4]
    records = [rec(i, "a", 0.0, [ttfts[k], ttfts[k] + 0.01 * (k + 1)], finish=ttfts[k] + 0.01 * (k + 1))
               for i, k in enumerate(order)]
    s = summarize(records, SLOS, duration_s=10.0)["a"]
    assert s["ttft_s"]["p50"] == pytest.approx(0.55)  # linear interpolation, by hand
    assert s["ttft_s"]["p90"] == pytest.approx(0.91)
    assert s["ttft_s"]["p99"] == pytest.approx(0.991)
    for q in (50, 90, 99):
        assert s["ttft_s"][f"p{q}"] == pytest.approx(np.percentile(ttfts, q))
        assert s["tpot_s"][f"p{q}"] == pytest.approx(np.percentile([0.01 * k for k in range(1, 11)], q))
    assert s["ttft_attainment"] == 1.0 and s["tpot_attainment"] == 1.0


def test_throughput_bins_by_hand():
    bins = throughput_over_time(hand_records(), bin_s=10.0, duration_s=20.0)
    assert bins["start_s"] == [0.0, 10.0]
    assert bins["finished_requests"] == [4, 1]  # finishes at .25, 2, 4.125, 4.75 | 11.5
    assert bins["output_tokens"] == [10, 3]  # finished requests' tokens only
    assert bins["requests_per_s"] == pytest.approx([0.4, 0.1])
    assert bins["output_tokens_per_s"] == pytest.approx([1.0, 0.3])
    five = throughput_over_time(hand_records(), bin_s=5.0)  # duration from the events: 11.5 s
    assert five["start_s"] == [0.0, 5.0, 10.0]
    assert five["finished_requests"] == [4, 0, 1]
    edge = throughput_over_time([rec(0, "a", 0.0, [5.0, 10.0], finish=10.0)], bin_s=5.0, duration_s=10.0)
    assert edge["finished_requests"] == [0, 1] and edge["output_tokens"] == [0, 2]  # the end falls in the last bin


def test_records_duration():
    assert records_duration(hand_records()) == 11.5
    assert records_duration([]) == 0.0


def test_slos_from_solo_scale_times_median():
    solo = [rec(0, "a", 0.0, [0.1, 0.2], finish=0.2), rec(1, "a", 1.0, [1.3, 1.4, 1.5], finish=1.5),
            rec(2, "a", 2.0, [2.2, 2.5], finish=2.5),
            rec(3, "a", 3.0, [], finish=3.1, reason=None, error="boom"),  # ignored
            rec(4, "b", 0.0, [0.5, 1.5], finish=1.5)]
    slos = slos_from_solo(solo, scale=5)
    assert slos["a"].ttft_s == pytest.approx(5 * 0.2)  # median of .1, .3, .2
    assert slos["a"].tpot_s == pytest.approx(5 * 0.1)  # median of .1, .1, .3
    assert (slos["b"].ttft_s, slos["b"].tpot_s) == (pytest.approx(2.5), pytest.approx(5.0))
    assert slos_from_solo(solo, scale=2)["a"].ttft_s == pytest.approx(0.4)
    with pytest.raises(ValueError, match="no finished request"):
        slos_from_solo([solo[3]], scale=5)


def test_slos_from_config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("devices: [{device: cpu, memory: 64MiB}]\nmodels:\n"
                    "  - {name: a, source: tiny-llama:random, ttft_slo_ms: 1500, tpot_slo_ms: 80}\n"
                    "  - {name: b, source: tiny-qwen2:random}\n")
    slos = slos_from_config(path)
    assert slos == {"a": SLOTargets(1.5, 0.08), "b": SLOTargets(2.0, 0.2)}  # b: the config defaults


def test_missing_slo_and_bad_targets_are_value_errors():
    with pytest.raises(ValueError, match="no SLO for model 'b'"):
        summarize(hand_records(), {"a": SLOS["a"]}, 20.0)
    with pytest.raises(ValueError):
        SLOTargets(0.0, 1.0)


def test_markdown_table_rows():
    table = markdown_table(summarize(hand_records(), SLOS, duration_s=20.0))
    lines = table.splitlines()
    assert len(lines) == 5 and lines[2].startswith("| a | 5 | 3 |") and lines[-1].startswith("| overall | 7 | 5 |")
    assert "| 40% | 40% | 20% | 0.05 |" in lines[2]
    assert "| 57% | 57% | 43% | 0.15 |" in lines[-1]


def memory_log(path):
    lines = [{"kind": "request", "model": "a", "req_id": "x", "finish_reason": "length"}]
    for k in range(6):
        lines.append({"kind": "device", "time": 100.0 + k, "device": "cpu", "page_size": 256 << 10,
                      "budget_pages": 2048, "free_pages": 2048 - 100 - 10 * k,
                      "models": {"a": {"resident": True, "weight_pages": 60, "kv_pages": 10 * k},
                                 "b": {"resident": True, "weight_pages": 40, "kv_pages": 0}}})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_write_report_files(tmp_path):
    report = write_report(tmp_path / "out", hand_records(), SLOS, 20.0, title="hand",
                          memory_log=memory_log(tmp_path / "mem.jsonl"))
    out = tmp_path / "out"
    data = json.loads((out / "summary.json").read_text())
    assert data == json.loads(json.dumps(report))
    assert data["summary"]["overall"]["slo_attainment"] == pytest.approx(3 / 7)
    assert data["throughput_over_time"]["finished_requests"] == [4, 1]
    assert data["memory"]["peak_used_gib"] == pytest.approx(150 * (256 << 10) / 2**30)
    md = (out / "summary.md").read_text()
    assert md.startswith("# hand") and "| overall | 7 | 5 |" in md and "goodput" in md
    assert "SLO attainment (requests meeting both TTFT and TPOT) 43%" in md  # the headline: 3 of 7
    for name in ("ttft_cdf.png", "tpot_cdf.png", "e2e_cdf.png", "throughput.png", "memory.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"]({name})" in md


def test_records_roundtrip_and_cli_report(tmp_path, capsys):
    path = tmp_path / "requests.jsonl"
    save_records(path, hand_records())
    with path.open("a") as f:  # a newer writer's extra key is ignored
        f.write(json.dumps({**json.loads(path.read_text().splitlines()[0]), "index": 7, "extra": 1}) + "\n")
    loaded = load_records(path)
    assert loaded[:7] == hand_records() and len(loaded) == 8

    save_records(path, hand_records())
    rc = main(["bench", "report", "--records", str(path), "--out", str(tmp_path / "r"),
               "--slo-ttft-ms", "1000", "--slo-tpot-ms", "500", "--duration", "20"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| overall | 7 | 5 |" in out
    data = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert data["slos"] == {"a": {"ttft_s": 1.0, "tpot_s": 0.5}, "b": {"ttft_s": 1.0, "tpot_s": 0.5}}
    assert data["duration_s"] == 20.0


def test_cli_report_errors_are_one_line(tmp_path, capsys):
    path = tmp_path / "requests.jsonl"
    save_records(path, hand_records())
    cases = [
        ["--records", str(path), "--out", str(tmp_path / "x")],  # no SLOs
        ["--records", str(path), "--out", str(tmp_path / "x"), "--slo-ttft-ms", "100"],
        ["--records", str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "x"), "--slo-ttft-ms", "1", "--slo-tpot-ms", "1"],
        ["--records", str(path), "--out", str(tmp_path / "x"), "--slo-config", str(tmp_path / "none.yaml")],
    ]
    for args in cases:
        assert main(["bench", "report", *args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("prism: error: ") and "\n" not in err, err


def test_tpot_is_finish_minus_first_token_over_output_tokens_minus_one():
    # 5 output tokens, 3 of them streamed with text; the request finishes at 3.0
    r = rec(0, "a", 0.0, [1.0, 1.5, 2.0], finish=3.0, n=5)
    assert r.tpot == pytest.approx((3.0 - 1.0) / 4)
    assert rec(1, "a", 0.0, [1.0], finish=1.0).tpot is None  # one output token: no TPOT
    assert rec(2, "a", 0.0, [1.0, 1.5], finish=None, reason=None).tpot is None  # unfinished


def test_slo_attainment_counts_requests_meeting_both_slos():
    records = [rec(0, "a", 0.0, [2.0, 2.1], finish=2.1),  # TTFT miss, TPOT met
               rec(1, "a", 0.0, [0.5, 1.5], finish=1.5),  # TTFT met, TPOT miss
               rec(2, "a", 0.0, [0.5, 0.6], finish=0.6)]  # both met
    s = summarize(records, SLOS, duration_s=1.0)["a"]
    assert s["ttft_attainment"] == pytest.approx(2 / 3) and s["tpot_attainment"] == pytest.approx(2 / 3)
    assert s["slo_attainment"] == pytest.approx(1 / 3)
