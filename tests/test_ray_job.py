"""`ray job submit` path: a real Ray head started with `ray start`, a job submitted with JobSubmissionClient."""
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    ray_bin = Path(sys.executable).with_name("ray")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    temp = tmp_path_factory.mktemp("rayhead")
    gcs, dash = free_port(), free_port()
    subprocess.run([str(ray_bin), "start", "--head", f"--port={gcs}", f"--dashboard-port={dash}", "--num-cpus=2",
                    "--include-dashboard=true", f"--temp-dir={temp}", "--disable-usage-stats"],
                   check=True, env=env, capture_output=True, timeout=120)
    try:
        yield f"http://127.0.0.1:{dash}"
    finally:
        subprocess.run([str(ray_bin), "stop", "--force"], env=env, capture_output=True, timeout=120)


@pytest.mark.slow
def test_submitted_score_job_succeeds(head, tmp_path, base_dir, pool_dir, task_file):
    from ray.job_submission import JobStatus, JobSubmissionClient

    work = tmp_path / "work"
    shutil.copytree(REPO, work, ignore=shutil.ignore_patterns(".venv*", ".cache", "runs", ".git", "__pycache__"))
    cfg = work / "job.yaml"
    cfg.write_text(f"# mashup score --config job.yaml\nbase: {base_dir}\ndonors: [{pool_dir / 'qv'}]\n"
                   f"data: {task_file}\nout: {tmp_path / 'out'}\nsamples: 8\nactors: 1\n")
    client = JobSubmissionClient(head)
    job = client.submit_job(
        entrypoint=f"{sys.executable} -m engine.cli score --config job.yaml",
        runtime_env={"working_dir": str(work), "env_vars": {"RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}},
    )
    deadline = time.time() + 300
    while (status := client.get_job_status(job)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.time() < deadline, "job did not finish in time"
        time.sleep(2)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    assert "scored 4, failed 0" in logs
    assert (tmp_path / "out" / "scores.parquet").exists()
