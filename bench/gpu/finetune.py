"""Part 3, `finetune`: the single-process executor on the device (float32, bfloat16) vs a CPU float32 run, and the
DeepSpeed ZeRO-2 executor at world size 1 launched by `torchrun -m engine.finetune.deepspeed_ray` (NCCL on GPU, gloo
on CPU, no Ray) vs the single-process run; `finetune_big`: bf16 step time on the throughput model."""
from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.gpu.common import REPO, big_world, free, log, small_world


def _torchrun(cfg, work: Path, name: str) -> tuple[list[dict], float, str]:
    """Run `cfg` through the Ray-free DeepSpeed entry point under torchrun; (log rows, seconds, output tail)."""
    from engine.finetune.outputs import read_log

    path = work / f"{name}.json"
    path.write_text(cfg.model_dump_json())
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           "-m", "engine.finetune.deepspeed_ray", str(path)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=420)
    secs = time.perf_counter() - t0
    tail = (proc.stdout + proc.stderr)[-4000:]
    if proc.returncode:
        raise RuntimeError(f"torchrun exited {proc.returncode}:\n{tail}")
    return read_log(Path(cfg.out)), secs, tail


def _summary(rows: list[dict]) -> dict:
    train = [r for r in rows if r["event"] == "train"]
    evals = [r for r in rows if r["event"] == "eval"]
    return {"train_losses": [r["loss"] for r in train], "eval_losses": [r["loss"] for r in evals],
            "grad_norms": [r.get("grad_norm") for r in train], "loop_seconds": train[-1]["seconds"] if train else None}


def _max_diff(a: list[float], b: list[float], n: int | None = None) -> float:
    pairs = list(zip(a, b))[:n]
    return max(abs(x - y) for x, y in pairs) if pairs else float("nan")


def part_finetune(work: Path, p: dict, pp: dict, device: str) -> dict:
    """Both executors on the part-1 world, float32 and bf16, compared loss for loss with stated tolerances."""
    from engine.finetune import FinetuneConfig, finetune
    from bench.world.tiny import write_task

    w = small_world(work / "small", pp)
    root = work / "finetune"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    data = write_task(root / "train.jsonl", p["train"], seed=3, op="reverse")
    held = write_task(root / "eval.jsonl", p["eval"], seed=4, op="reverse", choices=4)
    init = next(d for d in w["pool"] if d.name.startswith("qv"))
    gpu = device.startswith("cuda")

    def cfg(name: str, **over) -> FinetuneConfig:
        fields = dict(base=str(w["base"]), data=str(data), eval=str(held), out=str(root / name), init=str(init),
                      steps=p["steps"], batch_size=p["batch"], lr=p["lr"], warmup_steps=2,
                      eval_every=p["steps"] // 2, progress=False, device=device)
        return FinetuneConfig(**{**fields, **over})

    runs: dict = {}
    for name, c in (("cpu_float32", cfg("cpu_float32", device="cpu")),
                    ("device_float32", cfg("device_float32")),
                    ("device_bfloat16", cfg("device_bfloat16", dtype="bfloat16"))):
        t0 = time.perf_counter()
        res = finetune(c)
        runs[name] = {**_summary(res.log), "seconds": time.perf_counter() - t0}
        log(f"finetune {name}: train loss {runs[name]['train_losses'][0]:.4f} -> {runs[name]['train_losses'][-1]:.4f}"
            f", eval {runs[name]['eval_losses'][0]:.4f} -> {runs[name]['eval_losses'][-1]:.4f}")
        free(device)
    ds = {"num_workers": 1, "use_gpu": gpu, "zero_stage": 2}
    for name, dtype in (("deepspeed_zero2_float32", "float32"), ("deepspeed_zero2_bfloat16", "bfloat16")):
        try:
            rows, secs, tail = _torchrun(cfg(name, executor="deepspeed", deepspeed=ds, dtype=dtype), root, name)
            runs[name] = {**_summary(rows), "seconds": secs, "launcher": "torchrun --standalone --nproc_per_node=1 "
                          "-m engine.finetune.deepspeed_ray CONFIG.json", "backend": "nccl" if gpu else "gloo"}
            log(f"finetune {name}: train loss {runs[name]['train_losses'][0]:.4f} -> "
                f"{runs[name]['train_losses'][-1]:.4f} ({secs:.1f}s incl. launch)")
        except Exception as exc:  # noqa: BLE001
            runs[name] = {"error": f"{type(exc).__name__}: {exc}"[-4000:]}
            log(f"finetune {name} FAILED: {runs[name]['error'][-1500:]}")
    cpu, f32, b16 = runs["cpu_float32"], runs["device_float32"], runs["device_bfloat16"]
    checks = {
        "device_float32_vs_cpu_float32_first5_max_abs": _max_diff(f32["train_losses"], cpu["train_losses"], 5),
        "device_float32_vs_cpu_float32_all_max_abs": _max_diff(f32["train_losses"], cpu["train_losses"]),
        "device_float32_vs_cpu_eval_max_abs": _max_diff(f32["eval_losses"], cpu["eval_losses"]),
        "device_bfloat16_vs_cpu_float32_first5_max_abs": _max_diff(b16["train_losses"], cpu["train_losses"], 5),
        "device_bfloat16_vs_cpu_float32_all_max_abs": _max_diff(b16["train_losses"], cpu["train_losses"]),
        "loss_decreases": {k: v["eval_losses"][-1] < v["eval_losses"][0] - 0.05
                           for k, v in runs.items() if "eval_losses" in v},
    }
    if "train_losses" in runs.get("deepspeed_zero2_float32", {}):
        d = runs["deepspeed_zero2_float32"]
        checks["deepspeed_float32_vs_single_float32_max_abs"] = _max_diff(d["train_losses"], f32["train_losses"])
        checks["deepspeed_float32_vs_single_float32_eval_max_abs"] = _max_diff(d["eval_losses"], f32["eval_losses"])
    if "train_losses" in runs.get("deepspeed_zero2_bfloat16", {}):
        d = runs["deepspeed_zero2_bfloat16"]
        checks["deepspeed_bfloat16_vs_single_bfloat16_max_abs"] = _max_diff(d["train_losses"], b16["train_losses"])
        checks["deepspeed_bfloat16_vs_single_float32_max_abs"] = _max_diff(d["train_losses"], f32["train_losses"])
    tols = {"device_float32_vs_cpu_float32_first5": 1e-4, "device_bfloat16_vs_cpu_float32_first5": 5e-2,
            "deepspeed_float32_vs_single_float32": 1e-5}
    checks["tolerances"] = tols
    checks["pass"] = {
        k: bool(checks.get(f"{k}_max_abs", float("nan")) < t) for k, t in tols.items()
    }
    return {"config": {**p, "warmup_steps": 2, "init": f"donor {init.name} (q/v r8)", "model": pp}, "runs": runs,
            "checks": checks}


def part_finetune_big(work: Path, p: dict, tp: dict, device: str) -> dict:
    """Step time of the single executor in bf16 on the throughput model (fresh r16 q/k/v/o LoRA)."""
    from engine.finetune import FinetuneConfig, finetune

    w = big_world(work / "big", tp, device)
    out = {}
    for name, over in (("single_bfloat16", {}),):
        c = FinetuneConfig(base=str(w["base"]), data=str(w["task"]), out=str(work / "ft_big" / name), init=None,
                           steps=p["steps"], batch_size=p["batch"], lr=1e-4, progress=False, device=device,
                           dtype="bfloat16", overwrite=True,
                           lora={"r": 16, "alpha": 32, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
                           **over)
        t0 = time.perf_counter()
        res = finetune(c)
        train = [r for r in res.log if r["event"] == "train"]
        steps_s = [b["seconds"] - a["seconds"] for a, b in zip(train, train[1:])]
        tokens = statistics.mean(r["n_tokens"] for r in train)
        out[name] = {"seconds_total": time.perf_counter() - t0, "train_losses": [r["loss"] for r in train],
                     "median_step_s_after_first": statistics.median(steps_s) if steps_s else None,
                     "batch_size": p["batch"], "mean_completion_tokens_per_step": tokens}
        log(f"finetune_big {name}: median step {out[name]['median_step_s_after_first']}s, losses "
            f"{out[name]['train_losses'][0]:.3f} -> {out[name]['train_losses'][-1]:.3f}")
        free(device)
    return out
