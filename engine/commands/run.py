"""`mashup run`: every stage in order (score, select, merge, finetune each arm, evaluate) and a report."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="all stages, then a report", description=__doc__)
    p.add_argument("--config", required=True, help="YAML file (engine.run:RunConfig)")
    p.add_argument("--out", help="run folder (overrides the config)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from engine.core.config import build_config
    from engine.run import RunConfig, run as run_all

    cfg = build_config(RunConfig, args.config, {"out": args.out})
    report = run_all(cfg)
    print(f"report: {report}")
    return 0
