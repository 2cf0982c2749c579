"""Run by test_node_loss.py in its own process (it owns its Ray): a scoring job on a `ray.cluster_utils.Cluster`
of a head and two one-CPU worker raylets, one of which is removed while its actor is scoring.

"While its actor is scoring" is made certain, not likely: the scorer's gate hook (gate.py) holds the call that
includes GATED inside its batch; the node that runs that call is removed, and only then is the gate released.

Prints `RESULT {json}`: the job's summary, and the nodes still alive.
"""
from __future__ import annotations

import argparse
import json
import os
import threading
import time
from pathlib import Path

from gate import gate_env, release, wait_entered, wait_gone

GATED = "d04"  # a donor some calls after the first: rows are already recorded when its node goes


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
    gate = Path(args.out).parent / "gate"
    os.environ.update(gate_env(gate, GATED))  # the driver forwards MASHUP_TEST_* to the actors it starts
    cfg = ScoreConfig(base=args.base, donors=[args.donors], data=Path(args.data), out=Path(args.out), samples=8,
                      actors=2, placement="spread", donors_per_call=1, ray_address=cluster.address)
    result: dict = {}
    job = threading.Thread(target=lambda: result.update(summary=score(cfg)))
    job.start()
    entered = wait_entered(gate, job.is_alive)  # the call with GATED is held inside its batch on one worker
    [victim] = [w for w in workers if w.node_id == entered["node"]]
    removed_mid_run = job.is_alive()
    cluster.remove_node(victim, allow_graceful=False)
    wait_gone(entered["pid"])  # the held actor dies with its node before the gate opens
    release(gate)
    job.join(300)
    summary = result["summary"]
    gone = victim.node_id
    deadline = time.monotonic() + 180
    while any(n["NodeID"] == gone and n["Alive"] for n in ray.nodes()) and time.monotonic() < deadline:
        time.sleep(0.2)  # the job may finish before the GCS declares the node dead
    alive = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    print("RESULT " + json.dumps({
        "scored": summary.scored, "failed": summary.failed, "retries": summary.retries,
        "removed_mid_run": removed_mid_run, "gated": entered["donors"], "alive_nodes": len(alive),
        "removed_alive": gone in alive,
        "seconds": {"cluster": round(t_cluster, 1), "total": round(time.monotonic() - t0, 1)},
    }), flush=True)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main()
