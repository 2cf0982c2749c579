"""GPU validation and figures, without Ray: the hf scoring backend, its throughput, and both finetune executors.

One script, three parts, each recorded even when another fails (JSON rewritten after every part):

1. `parity`: the `hf` backend on the device vs an independent transformers+PEFT forward (one
   `PeftModel.from_pretrained` per donor, one example at a time, float32 on the CPU:
   `tests.adapters.peft_reference_loss`), in float32 and bfloat16, for three batchings on the device: several donors
   per pass, one donor per pass, one donor per call.
2. `throughput`: the `hf` backend vs the naive PEFT loop (`PeftModel.from_pretrained` → one padded forward with full
   logits → `unload`, as bench/common.py, on the device in bf16), same base, donors and sample, measured side by side
   in one process; plus forward FLOP/s over a plain bf16 matmul's FLOP/s on the same device.
3. `finetune`: the single-process executor on the device (float32 and bfloat16) vs a CPU float32 run, and the DeepSpeed
   ZeRO-2 executor at world size 1 launched by `torchrun -m engine.finetune.deepspeed_ray` (NCCL on GPU, no Ray)
   vs the single-process run; `finetune_big`: bf16 step time on the throughput model.

The parts live in bench/gpu/ (common.py, parity.py, throughput.py, finetune.py); this is the thin entry point.

Usage (device):  PYTHONUNBUFFERED=1 python -m bench.bench_gpu --out $OUT/gpu.json
Usage (CPU smoke test of the script itself): python -m bench.bench_gpu --device cpu --tiny --out /tmp/gpu_tiny.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

from bench.gpu.common import REPO, device_info, log, versions
from bench.gpu.finetune import part_finetune, part_finetune_big
from bench.gpu.parity import part_parity
from bench.gpu.throughput import part_throughput

FULL = dict(
    parity=dict(hidden=256, layers=4, heads=4, vocab=4096, examples=64, shots=2),
    throughput=dict(hidden=2048, inter=5632, layers=12, heads=16, vocab=32000, donors=64, examples=256, shots=8,
                    configs=[(8, 8192, "new"), (16, 16384, "new"), (8, 8192, "fp32_slots"),
                             (8, 8192, "original"), (32, 32768, "new")],
                    small_sample=(16, 32), matmul=8192),
    finetune=dict(steps=20, batch=8, lr=1e-2, train=64, eval=32),
    finetune_big=dict(steps=8, batch=16),
)
TINY = dict(
    parity=dict(hidden=64, layers=2, heads=4, vocab=1024, examples=12, shots=1),
    throughput=dict(hidden=128, inter=256, layers=2, heads=2, vocab=1024, donors=4, examples=16, shots=2,
                    configs=[(2, 256, "new"), (2, 256, "fp32_slots"), (2, 256, "original"), (2, 1024, "new")],
                    small_sample=(2, 4), matmul=512),
    finetune=dict(steps=4, batch=4, lr=1e-2, train=16, eval=8),
    finetune_big=dict(steps=2, batch=4),
)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="small sizes: a smoke test of this script on the CPU")
    ap.add_argument("--out", type=Path, default=None,
                    help="JSON path (default $OUT/gpu.json, else bench/results/gpu.json)")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder for models and runs")
    ap.add_argument("--parts", default="parity,throughput,finetune,finetune_big")
    args = ap.parse_args(argv)
    sizes = TINY if args.tiny else FULL
    out_path = args.out or (Path(os.environ["OUT"]) / "gpu.json" if os.environ.get("OUT") else
                            REPO / "bench/results/gpu.json")
    work = args.work or Path(f"/tmp/mashup_gpu_bench{'_tiny' if args.tiny else ''}")
    work.mkdir(parents=True, exist_ok=True)
    os.chdir(REPO)
    argv = sys.argv[1:] if argv is None else argv
    result = {"command": "PYTHONUNBUFFERED=1 python -m bench.bench_gpu " + " ".join(argv),
              "date": time.strftime("%Y-%m-%d"), "device": device_info(args.device), "versions": versions(),
              "sizes": sizes, "parts": {}}
    log(f"device {result['device']['name']}; versions {result['versions']}")

    def save() -> None:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(result, indent=1, default=str))

    runners = {
        "parity": lambda: part_parity(work, sizes["parity"], args.device),
        "throughput": lambda: part_throughput(work, sizes["throughput"], args.device),
        "finetune": lambda: part_finetune(work, sizes["finetune"], sizes["parity"], args.device),
        "finetune_big": lambda: part_finetune_big(work, sizes["finetune_big"], sizes["throughput"], args.device),
    }
    for part in args.parts.split(","):
        t0 = time.perf_counter()
        log(f"=== {part}")
        try:
            result["parts"][part] = runners[part]()
        except Exception as exc:  # noqa: BLE001 - record and go on with the next part
            traceback.print_exc()
            result["parts"][part] = {"error": f"{type(exc).__name__}: {exc}"[:3000],
                                     "traceback": traceback.format_exc()[-4000:]}
        result["parts"][part]["part_seconds"] = round(time.perf_counter() - t0, 1)
        save()
    log(f"wrote {out_path}")


if __name__ == "__main__":
    main()
