"""bench/bench_gpu.py's CPU smoke run (`--device cpu --tiny`) of the scoring parts: every part records a result,
the backend variants (built from public HFOptions) agree with the part-1 PEFT reference and the naive PEFT loop.

The finetune parts are left out (their torchrun DeepSpeed launches take minutes on a shared CPU); the executors they
call are tested in tests/engine/finetune/."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_tiny_cpu_run_of_the_scoring_parts(tmp_path):
    out = tmp_path / "gpu.json"
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "bench.bench_gpu", "--device", "cpu", "--tiny", "--parts", "parity,throughput",
           "--work", str(tmp_path / "work"), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    parts = json.loads(out.read_text())["parts"]
    assert set(parts) == {"parity", "throughput"}
    assert not [k for k, v in parts.items() if "error" in v], {k: v.get("error") for k, v in parts.items()}
    assert parts["parity"]["float32"]["pass"] and parts["parity"]["bfloat16"]["pass"]
    hf = parts["throughput"]["hf"]
    assert {r["variant"] for r in hf} == {"new", "fp32_slots", "original"}
    assert {r["path"] for r in hf if r["variant"] == "original"} == {"every pass mixes donors (adapter_names)"}
    for run in [*hf, parts["throughput"]["small_sample"]]:  # float32 on the CPU: the naive loop is plain PEFT
        assert run["max_abs_loss_diff_vs_naive"] < 1e-4, run
    assert parts["throughput"]["small_sample"]["max_abs_loss_diff_forced_vs_mixed"] < 1e-5
    assert parts["throughput"]["breakdown"]["profile"]["donors"] == 2
