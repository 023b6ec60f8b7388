"""scripts/device_check.py is run rarely (only where a GPU machine is lent), so CI runs it
on CPU: `prepare` writes the default model's config and tokenizer files without weights,
`run` builds random weights of that shape and must pass its checks against transformers
(top-20 logprobs, greedy generate, speculative == plain greedy, int4 and int8 against CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parents[2]


def test_device_check_passes_on_cpu(tmp_path):
    script = ROOT / "scripts" / "device_check.py"
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    subprocess.run([sys.executable, str(script), "prepare", str(tmp_path / "cfg")],
                   check=True, capture_output=True, text=True, env=env)
    assert sorted(p.name for p in (tmp_path / "cfg").iterdir()) == [
        "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]
    assert sum(p.stat().st_size for p in (tmp_path / "cfg").iterdir()) < 8 * 2**20  # travels
    run = subprocess.run([sys.executable, str(script), "run", str(tmp_path / "cfg"),
                          "--device", "cpu", "--max-tokens", "12", "--no-bench",
                          "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, env=env)
    lines = [ln for ln in run.stdout.splitlines() if ln.startswith(("PASS", "FAIL"))]
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    assert len(lines) == 5 and all(ln.startswith("PASS") for ln in lines), lines
