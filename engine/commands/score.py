"""`mashup score`: measure every donor's completion loss on a sample of the new task."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("score", help="score a donor pool on a task sample", description=__doc__)
    p.add_argument("--config", help="YAML file (engine.scoring:ScoreConfig); flags override it")
    p.add_argument("--base", help="base model folder or hf://org/name[@rev]")
    p.add_argument("--donors", nargs="+", help="folders, manifests (.jsonl), hf://…, hf-collection://…")
    p.add_argument("--data", help="task JSONL with prompt/completion")
    p.add_argument("--out", help="output folder (scores.parquet goes here)")
    p.add_argument("--samples", type=int, help="examples per donor (default 256)")
    p.add_argument("--seed", type=int, help="sampling seed (default 0)")
    p.add_argument("--backend", help="hf (default) or vllm")
    p.add_argument("--actors", type=int, help="number of scoring actors (default 1)")
    p.add_argument("--donors-per-call", type=int, dest="donors_per_call", help="donors per actor call (default 8)")
    p.add_argument("--ray-address", dest="ray_address", help="Ray cluster address (default: local Ray)")
    p.add_argument("--executor", choices=("ray", "local"),
                   help="ray (default): scoring actors; local: one scorer in this process, no Ray start-up (one "
                        "machine, one scorer)")
    p.add_argument("--strategy", choices=("exhaustive", "cascade", "screen"),
                   help="exhaustive (default, the paper), cascade (successive halving; options in the config's "
                        "cascade:) or screen (first-order screen + exact probe; options in the config's screen:)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from engine.core.config import build_config
    from engine.scoring import ScoreConfig, score

    keys = ("base", "donors", "data", "out", "samples", "seed", "backend", "actors", "donors_per_call", "ray_address",
            "strategy", "executor")
    cfg = build_config(ScoreConfig, args.config, {k: getattr(args, k) for k in keys})
    summary = score(cfg)
    print(
        f"scored {summary.scored}, failed {summary.failed}, already done {summary.skipped_done}, "
        f"actor retries {summary.retries}, {summary.seconds:.1f}s -> {summary.out / 'scores.parquet'}"
    )
    if summary.startup:
        print("  start-up: " + ", ".join(f"{k.replace('_', ' ')} after {v:.1f}s" for k, v in summary.startup.items()))
    for r in summary.rounds:
        print(f"  cascade round {r['round']}: {r['scored']} donors on {r['examples']} examples, kept {r['kept']}"
              + (" (final)" if r["final"] else ""))
    for donor, reason in sorted(summary.failures.items()):
        print(f"  failed {donor}: {reason}")
    print(f"  pool {summary.pool} (sample {summary.sample_id}); select it with: mashup select --scores "
          f"{summary.out / 'scores.parquet'} --pool {summary.pool} …")
    return 0
