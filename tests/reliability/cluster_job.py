"""Run by test_node_loss.py in its own process (it owns its Ray): a scoring job on a `ray.cluster_utils.Cluster`
of a head and two one-CPU worker raylets, one of which is removed while its actor is scoring.

Prints `RESULT {json}`: the job's summary, and the nodes still alive.
"""
from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path


def main() -> None:
    import ray
    from ray.cluster_utils import Cluster

    from engine.scoring import ScoreConfig, score

    parser = argparse.ArgumentParser()
    for flag in ("--base", "--donors", "--data", "--out"):
        parser.add_argument(flag, required=True)
    args = parser.parse_args()
    t0 = time.monotonic()
    # Fast node-failure detection, so the test does not wait out Ray's default health-check grace.
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 4}})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    t_cluster = time.monotonic() - t0
    cfg = ScoreConfig(base=args.base, donors=[args.donors], data=Path(args.data), out=Path(args.out), samples=8,
                      actors=2, placement="spread", donors_per_call=1, ray_address=cluster.address)
    result: dict = {}
    job = threading.Thread(target=lambda: result.update(summary=score(cfg)))
    job.start()
    journal = Path(args.out) / "scores.journal.jsonl"
    deadline = time.monotonic() + 180
    while not (journal.exists() and journal.read_text().count("\n") >= 3) and time.monotonic() < deadline:
        time.sleep(0.05)  # both actors placed (one per worker node) and scoring
    removed_mid_run = job.is_alive()
    cluster.remove_node(workers[0], allow_graceful=False)
    job.join(300)
    summary = result["summary"]
    gone = workers[0].node_id
    while any(n["NodeID"] == gone and n["Alive"] for n in ray.nodes()) and time.monotonic() < deadline:
        time.sleep(0.2)  # the job may finish before the GCS declares the node dead
    alive = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    print("RESULT " + json.dumps({
        "scored": summary.scored, "failed": summary.failed, "retries": summary.retries,
        "removed_mid_run": removed_mid_run, "alive_nodes": len(alive), "removed_alive": gone in alive,
        "seconds": {"cluster": round(t_cluster, 1), "total": round(time.monotonic() - t0, 1)},
    }), flush=True)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main()
