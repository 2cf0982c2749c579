"""Run by test_finetune_faults.py in its own process (it owns its Ray): a 2-worker DeepSpeed ZeRO-2 finetune under
Ray Train on a `ray.cluster_utils.Cluster` of a head and two one-CPU worker raylets, first without a fault, then with
two: a worker process SIGKILLed after step 3 (the last state is step 2's) and a worker's node removed after step 7
(the last state is step 6's); then the driver itself: `mashup finetune` SIGKILLed after step 5 (the last state is
step 4's), and the same command run again.

"After step N" is made certain, not likely: the training loop's step gate (engine/finetune/loop.py, STEP_GATE) holds
every rank after the train row of step N; the test strikes, waits until the struck process is gone, then releases.

Prints `RESULT {json}`: the runs' logs, the struck pid and node, and the nodes still alive.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import threading
import time
from pathlib import Path

from gate import release, wait_gone, wait_until

KILL_AT, REMOVE_AT, DRIVER_KILL_AT = 3, 7, 5


def entered(gate: Path, step: int, alive) -> list[dict]:
    """Both ranks' markers at the gate of `step`."""
    def both() -> list[dict] | None:
        found = [json.loads(p.read_text()) for p in (gate / f"step-{step}").glob("entered-*.json")]
        return sorted(found, key=lambda m: m["rank"]) if len(found) == 2 else None

    return wait_until(both, alive, f"both ranks reached step {step}'s gate", timeout_s=300)


def registered(snapshot: Path, step: int, alive) -> None:
    """Until Ray Train has registered the state of `step` as its latest checkpoint. A worker's report reaches the
    controller when it next polls the workers: a fault before that falls back to the state before (tested here
    with the state the gate's step follows, so the expected resume step is exact)."""
    def latest() -> bool:
        try:
            result = json.loads(snapshot.read_text()).get("latest_checkpoint_result") or {}
        except (OSError, json.JSONDecodeError):
            return False
        return result.get("checkpoint_dir_name") == f"state-{step:06d}"

    wait_until(latest, alive, f"Ray Train registered the state of step {step}", timeout_s=120)


def kill_the_driver(cfg, root: Path, address: str) -> list[dict]:
    """`mashup finetune` in its own process, SIGKILLed at the gate after DRIVER_KILL_AT (its Ray Train controller and
    workers die with it), then the same command again: the log of the run it finishes."""
    import subprocess
    import sys

    from engine.core.fault_hooks import GATE_DIR_HOOK
    from engine.finetune.loop import STEP_GATE
    from engine.finetune.outputs import read_log
    from engine.finetune.resume import ray_train_name

    path = root / "driver_killed.json"
    path.write_text(cfg.model_dump_json())
    gate = root / "gate_driver"
    env = {**os.environ, STEP_GATE: str(DRIVER_KILL_AT), GATE_DIR_HOOK: str(gate), "RAY_ADDRESS": address}
    command = [sys.executable, "-m", "engine.cli", "finetune", "--config", str(path)]
    driver = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    markers = entered(gate, DRIVER_KILL_AT, lambda: driver.poll() is None)
    snapshot = Path(cfg.out) / "ray_train" / ray_train_name(cfg) / "checkpoint_manager_snapshot.json"
    registered(snapshot, DRIVER_KILL_AT - 1, lambda: driver.poll() is None)
    driver.kill()
    driver.wait()
    for marker in markers:
        wait_gone(marker["pid"])
    release(gate / f"step-{DRIVER_KILL_AT}")
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    return read_log(Path(cfg.out))


def main() -> None:
    import ray
    from ray.cluster_utils import Cluster

    from engine.finetune import FinetuneConfig, finetune
    from engine.finetune.loop import STEP_GATE
    from engine.finetune.resume import ray_train_name
    from engine.core.fault_hooks import GATE_DIR_HOOK

    parser = argparse.ArgumentParser()
    for flag in ("--base", "--data", "--eval", "--root"):
        parser.add_argument(flag, required=True)
    args = parser.parse_args()
    root = Path(args.root)
    t0 = time.monotonic()
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": True,
        "_system_config": {"health_check_period_ms": 500, "health_check_failure_threshold": 4}})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False)

    def config(name: str) -> FinetuneConfig:
        return FinetuneConfig(
            base=args.base, data=args.data, eval=args.eval, out=str(root / name), steps=8, batch_size=4, lr=2e-2,
            warmup_steps=1, eval_every=4, save_every=2, progress=False, executor="deepspeed",
            ray_address=cluster.address,
            deepspeed={"num_workers": 2, "zero_stage": 2, "cpus_per_worker": 0.5, "placement_strategy": "SPREAD"})

    reference = finetune(config("uninterrupted"))
    t_reference = time.monotonic() - t0

    gate = root / "gate"
    os.environ.update({STEP_GATE: f"{KILL_AT},{REMOVE_AT}", GATE_DIR_HOOK: str(gate)})  # forwarded to the workers
    faulted_cfg = config("faulted")
    snapshot = root / "faulted" / "ray_train" / ray_train_name(faulted_cfg) / \
        "checkpoint_manager_snapshot.json"
    result: dict = {}
    job = threading.Thread(target=lambda: result.update(run=finetune(faulted_cfg)))
    job.start()
    killed = entered(gate, KILL_AT, job.is_alive)[1]
    registered(snapshot, KILL_AT - 1, job.is_alive)
    os.kill(killed["pid"], signal.SIGKILL)  # a real SIGKILL of rank 1's worker process
    wait_gone(killed["pid"])
    release(gate / f"step-{KILL_AT}")
    struck = entered(gate, REMOVE_AT, job.is_alive)[1]
    registered(snapshot, REMOVE_AT - 1, job.is_alive)
    [victim] = [w for w in workers if w.node_id == struck["node"]]
    cluster.remove_node(victim, allow_graceful=False)
    wait_gone(struck["pid"])
    release(gate / f"step-{REMOVE_AT}")
    job.join(600)
    faulted = result["run"]
    alive = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    driver_killed = kill_the_driver(config("driver_killed"), root, cluster.address)
    print("RESULT " + json.dumps({
        "reference": reference.log, "faulted": faulted.log, "driver_killed": driver_killed, "killed_pid": killed["pid"],
        "removed_node": victim.node_id, "removed_alive": victim.node_id in alive,
        "adapters": [str(reference.adapter), str(faulted.adapter)],
        "states_left": sorted(str(p) for name in ("faulted", "driver_killed")
                              for p in (root / name / "ray_train").rglob("state.json")),
        "seconds": {"reference": round(t_reference, 1), "total": round(time.monotonic() - t0, 1)},
    }), flush=True)
    ray.shutdown()
    cluster.shutdown()


if __name__ == "__main__":
    main()
