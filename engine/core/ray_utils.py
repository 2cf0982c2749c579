"""Connecting to Ray: reuse a running session, join a cluster, or start a local one."""
from __future__ import annotations

import os

WORKER_ENV = {
    "TOKENIZERS_PARALLELISM": "false",
    "OMP_WAIT_POLICY": "PASSIVE",
    "KMP_BLOCKTIME": "0",
    "RAY_USAGE_STATS_ENABLED": "0",
    "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "0"),
}


def ensure_ray(address: str | None = None, **init_kwargs) -> None:
    """Inside `ray job submit` (RAY_ADDRESS set) this joins the cluster; with no address, it starts Ray locally."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(address=address, log_to_driver=True, **init_kwargs)


def cluster_has_gpus() -> bool:
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def actor_cpus(requested: float | str, actors: int) -> float:
    """CPUs each scoring actor reserves (and so its torch threads). `auto` gives the actors the cluster's CPUs: each
    gets an equal share of the total, at least 1, and never more than the smallest node holds, so every actor can
    be placed. A fixed default of 1 left a 2-core machine's single actor scoring on one thread, at half speed."""
    import ray

    if requested != "auto":
        return float(requested)
    per_node = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) > 0]
    if not per_node:
        return 1.0
    return float(max(1, min(int(min(per_node)), int(sum(per_node)) // max(1, actors))))
