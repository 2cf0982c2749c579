"""bench_mwa_donors' table and verdict: does representing each donor by its MWA checkpoint merge change the picks or
the outcome of Mashup selection?

Every pool is compared with the `final` pool (each donor's last checkpoint, what a donor usually publishes): the same
donor runs, the same target, the same finetune seeds, so held-out Δ are paired per seed. An outcome counts as changed
only when the paired mean Δ exceeds twice its standard error over seeds and 1 pp; the verdict says which.
"""
from __future__ import annotations

import json
import math
import os
import platform
import time
from pathlib import Path
from typing import Any

from engine.analysis import mean_std
from engine.core.atomic import atomic_write_text

README_BLOCK = "bench-mwa-donors"
LABEL = {"final": "final checkpoint", "mwa": "MWA merge (loss)", "uniform": "uniform average"}


def paired_delta(values: list[float], reference: list[float]) -> dict[str, float]:
    """Paired Δ over seeds (pp): mean, std, standard error, and whether it is beyond noise (> 2 s.e. and > 1 pp)."""
    deltas = [100 * (a - b) for a, b in zip(values, reference, strict=True)]
    mean, std = mean_std(deltas)
    se = std / math.sqrt(len(deltas)) if len(deltas) > 1 else math.inf
    return {"mean_pp": mean, "std_pp": std, "se_pp": se, "beyond_noise": abs(mean) > max(2 * se, 1.0)}


def compare(pools: dict[str, dict[str, Any]], reference: str = "final") -> dict[str, dict[str, Any]]:
    """Per pool against `reference`: are the picks the same set, and the paired held-out Δ of its mashup arm."""
    ref = pools[reference]
    ref_picks = [p["donor"] for p in ref["picks"]]
    out = {}
    for name, pool in pools.items():
        picks = [p["donor"] for p in pool["picks"]]
        out[name] = {"picks": picks, "same_picks": set(picks) == set(ref_picks), "same_order": picks == ref_picks,
                     "heldout_delta": paired_delta(pool["arms"]["mashup"]["heldout_per_seed"],
                                                   ref["arms"]["mashup"]["heldout_per_seed"])}
    return out


def _fmt(x: float | None, d: int = 3) -> str:
    return "—" if x is None else f"{x:.{d}f}"


def verdict(pools: dict[str, dict[str, Any]], cmp: dict[str, dict[str, Any]], scratch: dict[str, Any] | None,
            facts: dict[str, dict[str, Any]]) -> list[str]:
    last = [f["mwa_weights"][-1] for f in facts.values()]
    lines = [f"- **What an MWA donor is here:** its {len(next(iter(facts.values()))['steps'])} checkpoints weighted by "
             f"training loss put {min(last):.2f}–{max(last):.2f} of the weight on the final one, the rest on earlier, "
             "less-trained checkpoints of the same run."]
    for name, c in cmp.items():
        if name == "final":
            continue
        d = c["heldout_delta"]
        picks = ("the same two donors" + ("" if c["same_order"] else " (in another order)") if c["same_picks"]
                 else f"other donors ({', '.join(c['picks'])} instead of {', '.join(cmp['final']['picks'])})")
        outcome = (f"changes the outcome, for the {'worse' if d['mean_pp'] < 0 else 'better'} (|Δ| over 2 standard "
                   f"errors, {len(pools[name]['arms']['mashup']['heldout_per_seed'])} seeds)" if d["beyond_noise"]
                   else "does not change the outcome beyond noise (|Δ| within 2 standard errors or 1 pp)")
        lines.append(f"- **{LABEL[name]} pool vs final-checkpoint pool:** picks {picks}; held-out accuracy after the "
                     f"finetune {pools[name]['arms']['mashup']['heldout']:.3f} vs "
                     f"{pools['final']['arms']['mashup']['heldout']:.3f}, paired Δ {d['mean_pp']:+.1f} ± {d['std_pp']:.1f} pp "
                     f"over seeds: it {outcome}.")
    if "mwa" in pools and "uniform" in pools:
        c = compare(pools, "uniform")["mwa"]
        d = c["heldout_delta"]
        lines.append(f"- **MWA vs uniform average of the same checkpoints:** {'the same' if c['same_picks'] else 'different'} "
                     f"picks; paired Δ {d['mean_pp']:+.1f} ± {d['std_pp']:.1f} pp "
                     f"({'beyond' if d['beyond_noise'] else 'within'} noise).")
    if scratch is not None:
        best = max(pools, key=lambda p: pools[p]["arms"]["mashup"]["heldout"])
        lines.append(f"- **Recycling itself** (reference): scratch ends at {scratch['heldout']:.3f} held-out; the best pool "
                     f"({LABEL[best]}) at {pools[best]['arms']['mashup']['heldout']:.3f}.")
    return lines


def render(cfg, pools: dict[str, dict[str, Any]], facts: dict[str, dict[str, Any]], cmp: dict[str, dict[str, Any]],
           meta: dict[str, Any]) -> str:
    n_ckpt = len(next(iter(facts.values()))["steps"])
    lines = [f"Measured {meta['date']} on {meta['machine']}, {meta['cores']} cores, torch {meta['torch']}. Command: "
             f"`{meta['command']}` ({meta['seconds'] / 60:.1f} min for this invocation; cached donor runs, merges, scores "
             "and finetunes are reused).", "",
             f"Target `{cfg.target}`; {len(cfg.donors)} donors, one per task ({', '.join(cfg.donors)}), each retrained "
             f"with the world's donor recipe and seed with {n_ckpt} checkpoints. Pools: "
             + ", ".join(f"{LABEL[p]}" for p in pools) + "; each scored on 256 training examples (hf backend), top-2 by "
             f"loss, `linear` merge, then finetuned from the merge at lr {cfg.lr:g}, seeds {cfg.seeds} (the recycling "
             "bench's recipe). Accuracy: 4-way multiple choice; held-out: the eval split; Δ: paired per seed against the "
             "final-checkpoint pool.", "",
             "| pool | picks (scored loss on target; donor's final train loss) | step-0 val acc | final val acc ± std | "
             "held-out acc ± std | Δ held-out vs final pool (pp) |", "|---|---|---|---|---|---|"]
    for name, pool in pools.items():
        arm, d = pool["arms"]["mashup"], cmp[name]["heldout_delta"]
        picks = ", ".join(f"{p['donor']} ({p['loss']:.3f}; {_fmt(facts[p['donor']]['final_train_loss'])})"
                          for p in pool["picks"])
        lines.append(f"| {LABEL[name]} | {picks} | {_fmt(arm['step0'])} | {_fmt(arm['final'])} ± {_fmt(arm['final_std'])} "
                     f"| {_fmt(arm['heldout'])} ± {_fmt(arm['heldout_std'])} | "
                     + ("—" if name == "final" else f"{d['mean_pp']:+.1f} ± {d['std_pp']:.1f}") + " |")
    scratch = next((p["arms"]["scratch"] for p in pools.values() if "scratch" in p["arms"]), None)
    if scratch is not None:
        lines.append(f"| scratch (no donors) | — | {_fmt(scratch['step0'])} | {_fmt(scratch['final'])} ± "
                     f"{_fmt(scratch['final_std'])} | {_fmt(scratch['heldout'])} ± {_fmt(scratch['heldout_std'])} | — |")
    lines += ["", *verdict(pools, cmp, scratch, facts)]
    return "\n".join(lines)


def render_rankings(pools: dict[str, dict[str, Any]], top: int = 6) -> str:
    """The head of each pool's ranking by scored loss: where the picks came from."""
    lines = [f"Top {top} of each pool by scored loss on the target (base model: "
             + ", ".join(f"{_fmt(p['base_loss'])}" for p in pools.values()) + "):", "",
             "| rank | " + " | ".join(LABEL[p] for p in pools) + " |", "|---|" + "---|" * len(pools)]
    for i in range(top):
        cells = [f"{r[i]['donor']} ({r[i]['loss']:.3f})" if i < len(r) else "" for r in (p["ranking"] for p in pools.values())]
        lines.append(f"| {i + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_summary(cfg, pools: dict[str, dict[str, Any]], facts: dict[str, dict[str, Any]], seconds: float,
                  command: str = "python -m bench.bench_mwa_donors --readme") -> Path:
    """mwa_donors.json and .md; README's block when cfg.readme (after the JSON, so a missing marker loses nothing)."""
    import torch

    cmp = compare(pools) if "final" in pools else {p: {"heldout_delta": {"mean_pp": 0.0, "std_pp": 0.0, "se_pp": 0.0,
                                                                        "beyond_noise": False}} for p in pools}
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": platform.machine(), "cores": os.cpu_count(),
            "torch": torch.__version__, "seconds": seconds, "command": command}
    text = render(cfg, pools, facts, cmp, meta) if "final" in pools else "(no `final` pool: nothing to compare with)"
    results = Path(cfg.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    payload = {"config": cfg.model_dump(mode="json"), "meta": meta, "comparison": cmp, "pools": pools, "donors": facts}
    atomic_write_text(results, json.dumps(payload, indent=1))
    atomic_write_text(results.with_suffix(".md"), "# Donors represented by their MWA checkpoint merge "
                      "(bench/bench_mwa_donors.py)\n\n" + text + "\n\n" + render_rankings(pools) + "\n")
    if cfg.readme:
        from bench.readme import replace_block

        replace_block(README_BLOCK, text)
    return results
