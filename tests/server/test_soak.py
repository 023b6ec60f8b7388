"""A short soak (scripts/soak.py's `run_soak`, 25 s) against a real server on the shared
engine: mtpserve-loadtest in open loop above what the engine can serve, so its slots and
the admission queue stay full and the excess gets 429. Every answer must be its own
prompt's answer alone (greedy, fp32; or differ only past a near tie, see soak.py), no
error but 429, the server's counters agree, the
engine idle afterwards, RSS and fds of this process (the server runs in it) back near
where they started. The 10-minute version: bash scripts/soak.sh (docs/reliability.md).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from mtpserve.server.app import ServerSettings

SOAK = Path(__file__).resolve().parents[2] / "scripts" / "soak.py"


def load_soak():
    spec = importlib.util.spec_from_file_location("soak_script", SOAK)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_soak_at_saturation(make_server, shared_runner, tmp_path):
    soak = load_soak()
    srv = make_server(ServerSettings(max_num_seqs=4, max_queued=4))  # 8 in flight at most
    report = soak.run_soak(
        srv.url, os.getpid(), tmp_path, duration_s=float(os.environ.get("SOAK_S", "25")),
        num_prompts=4, max_tokens=8, max_num_seqs=shared_runner.engine.config.max_num_seqs,
        minute_s=10.0, rss_slack_mib=128.0, fd_slack=4)
    print("\n" + soak.markdown(report))
    assert report["passed"], report["checks"]
    q = report["requests"]
    assert q["ok"] >= 4 and q["http_429"] > 0 and q["other_errors"] == 0
    assert q["mixed_up"] == 0 and q["unexplained"] == 0
    assert srv.state.client.inflight == 0
