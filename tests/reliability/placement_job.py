"""Run by test_placement.py in its own process (it owns its Ray): scoring on a `ray.cluster_utils.Cluster` whose
two worker raylets stand in for nodes, each with its own Hub cache, while the driver's cache is empty.

Node A advertises `{"scorer": 2, "node_a": 1}` and the label zone=a, node B `{"scorer": 2, "node_b": 1}` and
zone=b; the head has CPUs but no `scorer`. Three jobs over the same Hub donors (HF_HUB_OFFLINE=1, so each node can
only read its own cache): `spread` (2 actors asking for `scorer`), `pinned` (2 actors asking for `node_a`, of which node A has 1: one fits) and
`labelled` (1 actor selecting zone=b). An audit hook records every file the driver opens.

In `spread`, both actors must score, whatever the machine's speed (a fast actor could otherwise take every batch
before the other has started): the scorer's gate hook (gate.py) holds the first call with GATED until the other
actor has recorded rows.

Prints `RESULT {json}`: per job, the rows' losses and revisions and the placement log; the nodes; the driver's opens.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

from gate import gate_env, release, wait_entered, wait_until

GATED = "acme/p0"
OPENED: list[str] = []


def _audit(event: str, args: tuple) -> None:
    if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        OPENED.append(os.fsdecode(args[0]))


def score_both_actors(cfg, out: Path):
    """`score(cfg)` with the call that holds GATED held until a row comes from another actor than its own."""
    from engine.scoring import score

    gate = out.parent / "gate-spread"
    hooks = gate_env(gate, GATED)
    os.environ.update(hooks)  # the driver forwards MASHUP_TEST_* to the actors it starts
    result: dict = {}
    job = threading.Thread(target=lambda: result.update(summary=score(cfg)))
    job.start()
    try:
        held = wait_entered(gate, job.is_alive)

        def other_actor_scored() -> bool:
            log = out / "placement.jsonl"
            lines = log.read_text().split("\n")[:-1] if log.exists() else []  # whole lines only
            rows = [json.loads(line) for line in lines]
            return any(row["pid"] != held["pid"] for row in rows)

        wait_until(other_actor_scored, job.is_alive, "the second actor scored a batch")
    finally:
        release(gate)
        job.join()
        for key in hooks:
            del os.environ[key]
    return result["summary"]


def main() -> None:
    parser = argparse.ArgumentParser()
    for flag in ("--base", "--data", "--out", "--caches"):
        parser.add_argument(flag, required=True)
    parser.add_argument("--donors", nargs="+", required=True)
    args = parser.parse_args()
    caches = Path(args.caches)
    os.environ.update(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(caches / "driver"))  # before huggingface_hub is imported

    import ray
    from ray.cluster_utils import Cluster

    t0 = time.monotonic()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    nodes = {}
    for name in ("a", "b"):
        os.environ["HF_HUB_CACHE"] = str(caches / name)  # a raylet and its workers inherit the environment
        nodes[name] = cluster.add_node(num_cpus=2, resources={"scorer": 2, f"node_{name}": 1},
                                       labels={"zone": name})
    os.environ["HF_HUB_CACHE"] = str(caches / "driver")
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)
    t_cluster = time.monotonic() - t0

    from engine.scoring import ScoreConfig, score
    from engine.scoring.store import read_scores

    jobs = {"spread": {"actors": 2, "actor_resources": {"scorer": 1}},
            "pinned": {"actors": 2, "actor_resources": {"node_a": 1}},
            "labelled": {"actors": 1, "node_labels": {"zone": "b"}}}
    result: dict = {"nodes": {name: node.node_id for name, node in nodes.items()}, "jobs": {}}
    sys.addaudithook(_audit)
    for name, placement in jobs.items():
        out = Path(args.out) / name
        t1 = time.monotonic()
        cfg = ScoreConfig(base=args.base, donors=args.donors, data=Path(args.data), out=out, samples=8,
                          donors_per_call=2, placement="spread", ray_address=cluster.address, **placement)
        summary = score_both_actors(cfg, out) if name == "spread" else score(cfg)
        df = read_scores(out)
        placed = [json.loads(line) for line in (out / "placement.jsonl").read_text().splitlines()]
        result["jobs"][name] = {
            "scored": summary.scored, "failed": summary.failed, "seconds": round(time.monotonic() - t1, 1),
            "loss": dict(zip(df.donor, df.loss)), "revision": dict(zip(df.donor, df.revision)),
            "placement": placed,
        }
    result["driver_opened"] = sorted({p for p in OPENED if "adapter_model" in p or "snapshots" in p})
    result["driver_saw_data_file"] = any(Path(p) == Path(args.data) for p in OPENED)  # the hook does see opens
    result["driver_cache"] = sorted(p.name for p in (caches / "driver").glob("*"))
    result["seconds"] = {"cluster": round(t_cluster, 1), "total": round(time.monotonic() - t0, 1)}
    print("RESULT " + json.dumps(result), flush=True)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main()
