"""The command line end to end against the scripted peer, and package isolation."""
import json
import subprocess
import sys

import pytest

import mtpserve.loadtest.plots as plots
from mtpserve.loadtest.cli import main


def workload(tmp_path):
    path = tmp_path / "w.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i} {d}"}) + "\n"
                            for i, d in enumerate(["", "[[diverge=2]]", "", ""])))
    return path


def test_cli_ab_sweep_writes_reports(server, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main(["--base-url", server.base_url + "/v1", "--workload", f"jsonl:{workload(tmp_path)}",
               "--max-tokens", "9", "--concurrency", "1,2", "--request-rate", "inf",
               "--warmup", "1", "--ab", "--extra-body-a", '{"speculation": {"enabled": false}}',
               "--extra-body-b", '{"speculation": {"enabled": true}}', "--bootstrap", "200",
               "--slo-ttft-ms", "5000", "--out", str(out), "--timeout", "10"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert [lv["level"]["label"] for lv in res["levels"]] == ["c=1", "c=2", "rate=inf/s"]
    assert res["levels"][2]["level"]["value"] == "inf"
    assert len(res["requests"]) == 3 * 4 * 2
    assert res["config"]["arms"][1]["extra_body"] == {"speculation": {"enabled": True}}
    for lv in res["levels"]:
        assert lv["arms"]["B"]["num_ok"] == 4
        assert lv["server_metrics"]["server"]["mtpserve"]["acceptance_rate"] == pytest.approx(2 / 3)
        assert [m["prompt_id"] for m in lv["ab"]["mismatches"]] == ["line2"]
    md = (out / "summary.md").read_text()
    assert "## A/B: B vs A" in md and "3/4 identical" in md
    assert md in capsys.readouterr().out
    assert plots.matplotlib_missing() is None  # a default install draws the plots
    for name in ("latency_cdf", "throughput", "speedup", "acceptance_per_position"):
        assert (out / f"{name}.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_without_matplotlib_skips_plots(server, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(plots, "matplotlib_missing", lambda: "matplotlib is not installed")
    out = tmp_path / "out"
    rc = main(["--base-url", server.base_url, "--model", "m", "--workload",
               f"jsonl:{workload(tmp_path)}", "--max-tokens", "3", "--num-requests", "2",
               "--warmup", "0", "--no-metrics", "--out", str(out), "--no-progress"])
    assert rc == 0
    assert "matplotlib is not installed" in capsys.readouterr().err
    assert (out / "summary.md").exists() and not list(out.glob("*.png"))


def test_cli_all_requests_fail_and_bad_args(server, tmp_path, capsys):
    path = tmp_path / "w.jsonl"
    path.write_text('{"prompt": "[[mode=503]]"}\n')
    rc = main(["--base-url", server.base_url, "--workload", f"jsonl:{path}", "--warmup", "0",
               "--out", str(tmp_path / "o"), "--no-plots", "--no-progress"])
    assert rc == 1
    assert "| c=1 | main | http_5xx | 1 |" in (tmp_path / "o" / "summary.md").read_text()
    for bad in (["--ab"], ["--extra-body-b", "{}"], ["--extra-body", "[1]"],
                ["--concurrency", "0"]):
        with pytest.raises(SystemExit) as e:
            main(["--base-url", server.base_url, "--workload", "synthetic:4,2", "--num-prompts",
                  "1", "--warmup", "0", "--out", str(tmp_path / "x"), "--no-plots", *bad])
        assert e.value.code == 2


def test_unreachable_server_is_a_clean_error(tmp_path, capsys):
    rc = main(["--base-url", "http://127.0.0.1:9", "--workload", "synthetic:4,4",
               "--num-prompts", "2", "--out", str(tmp_path / "o"), "--timeout", "2"])
    assert rc == 2 and "pass --model" in capsys.readouterr().err


def test_loadtest_imports_neither_engine_nor_server():
    code = ("import sys, mtpserve.loadtest.cli, mtpserve.loadtest.benchmark, "
            "mtpserve.loadtest.report, mtpserve.loadtest.plots; "
            "bad = [m for m in sys.modules if m.startswith(('mtpserve.decoding', "
            "'mtpserve.server', 'torch'))]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
