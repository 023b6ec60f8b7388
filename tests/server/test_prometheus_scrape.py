"""A real Prometheus (Debian's package, installed by scripts/install.sh --test) scrapes a
real mtpserve with the scrape config from deploy/prometheus/, and every query of the
Grafana dashboard returns data."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import yaml

from server_helpers import free_port

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = shutil.which("prometheus")


def _dashboard_queries() -> list[str]:
    dash = json.loads((ROOT / "deploy/grafana/dashboards/mtpserve.json").read_text())
    exprs = {t["expr"] for p in dash["panels"] for t in p.get("targets", []) if t.get("expr")}
    # Grafana's range variable becomes a window that holds several 1 s scrapes.
    return sorted(e.replace("$__rate_interval", "30s") for e in exprs)


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus binary not installed "
                    "(scripts/install.sh --test installs it when run as root)")
def test_prometheus_scrapes_server_and_dashboard_queries_return_data(server_url, model_name,
                                                                     tmp_path):
    # Traffic first, so every labelled series exists before the first scrape.
    body = {"model": model_name, "max_tokens": 16, "temperature": 0,
            "messages": [{"role": "user", "content": "Count: 1 2 3 4 5 6 1 2 3 4 5 6 1 2"}]}
    for _ in range(2):
        r = httpx.post(server_url + "/v1/chat/completions", json=body, timeout=120)
        assert r.status_code == 200
    assert r.json()["metrics"]["speculative_decoding"]["num_draft_tokens"] > 0

    cfg = yaml.safe_load((ROOT / "deploy/prometheus/prometheus.yml").read_text())
    cfg["global"]["scrape_interval"] = cfg["global"]["evaluation_interval"] = "1s"
    (job,) = cfg["scrape_configs"]
    job["scrape_interval"] = "1s"
    job["static_configs"] = [{"targets": [server_url.removeprefix("http://")]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(cfg))
    port = free_port()
    proc = subprocess.Popen(
        [PROMETHEUS, f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    api = f"http://127.0.0.1:{port}/api/v1"
    try:
        deadline = time.monotonic() + 60
        empty: list[str] = []
        while time.monotonic() < deadline:
            time.sleep(1)
            try:
                targets = httpx.get(api + "/targets", timeout=5).json()["data"]["activeTargets"]
            except (httpx.HTTPError, KeyError, ValueError):
                continue  # not up yet
            if not targets or targets[0]["health"] != "up":
                continue
            empty = []
            for expr in _dashboard_queries():
                res = httpx.get(api + "/query", params={"query": expr}, timeout=5).json()
                assert res["status"] == "success", (expr, res)
                if not res["data"]["result"]:
                    empty.append(expr)
            if not empty:
                break
        assert targets and targets[0]["health"] == "up", targets
        assert targets[0]["labels"]["job"] == "mtpserve"
        assert not empty, f"dashboard queries without data: {empty}"
    finally:
        proc.terminate()
        proc.wait(10)
