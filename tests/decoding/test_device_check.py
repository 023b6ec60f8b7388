"""scripts/device_check.py is run rarely (only where a GPU machine is lent), so CI runs it
on CPU: `prepare` writes the default model's config and tokenizer files without weights,
`run` builds random weights of that shape and must pass its checks against transformers
(top-20 logprobs, greedy generate, speculative == plain greedy, int4 and int8 against CPU)."""

from __future__ import annotations

import json
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
    # 2 of the model's 30 layers: the same checks on a quarter of its parameters (CI time)
    subprocess.run([sys.executable, str(script), "prepare", str(tmp_path / "cfg"),
                    "--num-layers", "2"], check=True, capture_output=True, text=True, env=env)
    assert sorted(p.name for p in (tmp_path / "cfg").iterdir()) == [
        "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"]
    assert sum(p.stat().st_size for p in (tmp_path / "cfg").iterdir()) < 8 * 2**20  # travels
    assert json.loads((tmp_path / "cfg" / "config.json").read_text())["num_hidden_layers"] == 2
    run = subprocess.run([sys.executable, str(script), "run", str(tmp_path / "cfg"),
                          "--device", "cpu", "--max-tokens", "12", "--no-bench",
                          "--out", str(tmp_path / "out")],
                         capture_output=True, text=True, env=env)
    lines = [ln for ln in run.stdout.splitlines() if ln.startswith(("PASS", "FAIL"))]
    assert run.returncode == 0, run.stdout + run.stderr[-3000:]
    assert len(lines) == 5 and all(ln.startswith("PASS") for ln in lines), lines
