"""A node removed mid-run: the job finishes on the nodes that remain, with every donor scored exactly once.

The cluster needs a Ray of its own, so the job runs in a subprocess (tests/reliability/cluster_job.py) and never
touches the session's local Ray that other test modules share. The node is removed while its actor is held inside
a batch by the scorer's gate hook (tests/reliability/gate.py), so a retry is certain on any machine.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.scoring.store import read_scores


@pytest.mark.slow
def test_removed_node_job_completes_on_the_remaining_nodes(tmp_path, many_donors, task_file, base_dir):
    script = Path(__file__).with_name("cluster_job.py")
    repo = Path(__file__).resolve().parents[2]
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, str(script), "--base", str(base_dir), "--donors", str(many_donors), "--data", str(task_file),
         "--out", str(out)],
        cwd=repo, capture_output=True, text=True, timeout=420,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    [line] = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
    report = json.loads(line.removeprefix("RESULT "))
    assert report["removed_mid_run"] and not report["removed_alive"] and report["alive_nodes"] == 2  # head + 1
    assert report["gated"] == ["d04"]  # the node went while its actor was inside d04's batch
    assert report["retries"] >= 1 and "actor died while scoring" in done.stderr
    assert report["scored"] == 17 and report["failed"] == 0
    df = read_scores(out)
    assert len(df) == 17 and df.donor.is_unique and (df.status == "ok").all()
