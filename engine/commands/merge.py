"""`mashup merge`: stream donor adapters into one PEFT adapter with a registered method."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from engine.merge.registry import METHODS

    p = sub.add_parser("merge", help="merge donor adapters into one", description=__doc__)
    p.add_argument("--config", help="YAML file (engine.merge:MergeConfig); flags override it")
    p.add_argument("--selection", help="selection.json from `mashup select`")
    p.add_argument("--donors", nargs="+", help="adapter folders (instead of --selection)")
    p.add_argument("--weights", nargs="+", type=float, help="one weight per --donors entry (normalized to sum 1)")
    p.add_argument("--method", choices=tuple(METHODS), help="merge method (default linear)")
    p.add_argument("--out", help="folder for the merged adapter")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), help="output dtype (default: the donors')")
    p.add_argument("--density", type=float, help="fraction of entries kept, for ties and dare_*")
    p.add_argument("--majority-sign", dest="majority_sign", choices=("total", "frequency"),
                   help="sign election for ties and dare_ties (default total)")
    p.add_argument("--seed", type=int, help="seed of the dare masks (default 0)")
    p.add_argument("--svd-rank", dest="svd_rank", type=int, help="rank of the svd merge (default: largest donor rank)")
    p.add_argument("--refactor-rank", dest="refactor_rank", type=int,
                   help="re-factor each merged module's ΔW to this rank by SVD (e.g. the scratch LoRA's r)")
    p.add_argument("--refactor-alpha", dest="refactor_alpha", type=float,
                   help="lora_alpha of the re-factored adapter (default: the rank, so scale 1)")
    p.add_argument("--overwrite", action="store_true", default=None, help="replace an existing --out folder")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="force the progress bar on/off")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import json

    from engine.core.config import build_config
    from engine.merge.config import MergeConfig
    from engine.merge.streaming import MERGE_INFO_FILE, merge_with_config
    from engine.core.paths import check_paths

    keys = ("selection", "donors", "weights", "method", "out", "dtype", "density", "majority_sign", "seed",
            "svd_rank", "refactor_rank", "refactor_alpha", "overwrite", "progress")
    config = build_config(MergeConfig, args.config, {k: getattr(args, k) for k in keys})
    check_paths(config, {"selection": "file", "donors": "adapter"})
    out = merge_with_config(config)
    info = json.loads((out / MERGE_INFO_FILE).read_text())
    print(f"merged {len(info['donors'])} donors ({info['method']}, r={info['r']}, {info['dtype']}) -> {out}")
    return 0
