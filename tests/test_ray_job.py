"""`ray job submit` path: a real Ray head started with `ray start`, a job submitted with JobSubmissionClient."""
import os
import shutil
import signal
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
    """A head of our own (`ray start --block` in its own session), stopped by killing that session only:
    `ray stop` would stop every Ray on the machine, including this test session's other cluster."""
    from ray.job_submission import JobSubmissionClient

    ray_bin = Path(sys.executable).with_name("ray")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
    temp = tmp_path_factory.mktemp("rayhead")
    gcs, dash = free_port(), free_port()
    # Every agent port explicitly free: the session's own local Ray already holds the defaults (52365, ...), and a
    # second head whose job agent cannot bind answers "No available agent to submit job" forever.
    agent_ports = [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                   f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}"]
    proc = subprocess.Popen([str(ray_bin), "start", "--head", "--block", f"--port={gcs}", f"--dashboard-port={dash}",
                             *agent_ports, "--num-cpus=2", "--include-dashboard=true", f"--temp-dir={temp}",
                             "--disable-usage-stats"],
                            env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    address = f"http://127.0.0.1:{dash}"
    deadline = time.time() + 120
    while True:
        try:
            JobSubmissionClient(address).list_jobs()
            break
        except Exception:  # noqa: BLE001 - the dashboard is still starting
            assert proc.poll() is None and time.time() < deadline, "ray head did not start"
            time.sleep(1)
    try:
        yield address
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.slow
def test_submitted_score_job_succeeds(head, tmp_path, base_dir, pool_dir, task_file):
    from ray.job_submission import JobStatus, JobSubmissionClient

    work = tmp_path / "work"
    shutil.copytree(REPO, work, ignore=shutil.ignore_patterns(".venv*", ".cache", "runs", ".git", "__pycache__"))
    cfg = work / "job.yaml"
    cfg.write_text(f"# mashup score --config job.yaml\nbase: {base_dir}\ndonors: [{pool_dir / 'qv'}]\n"
                   f"data: {task_file}\nout: {tmp_path / 'out'}\nsamples: 8\nactors: 1\n")
    client = JobSubmissionClient(head)
    deadline = time.time() + 120
    while True:  # the head's job agent comes up a little after the dashboard answers
        try:
            job = client.submit_job(
                entrypoint=f"{sys.executable} -m engine.cli score --config job.yaml",
                runtime_env={"working_dir": str(work), "env_vars": {"RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}},
            )
            break
        except RuntimeError as exc:
            if "No available agent" not in str(exc) or time.time() > deadline:
                raise
            time.sleep(2)
    while (status := client.get_job_status(job)) not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED}:
        assert time.time() < deadline, "job did not finish in time"
        time.sleep(2)
    logs = client.get_job_logs(job)
    assert status == JobStatus.SUCCEEDED, logs[-3000:]
    assert "scored 4, failed 0" in logs
    assert (tmp_path / "out" / "scores.parquet").exists()
