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
