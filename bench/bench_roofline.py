"""Scoring against its physical limit: one donor's exact score costs at least one forward pass of the base over its
sample (the LoRA adds r·(d_in + d_out)/(d_in·d_out) of each adapted module's FLOPs); everything above is overhead.

Per base, in one run, on one machine, same threads:
- `limit`: a plain transformers forward of the base over the sample (no PEFT), encoded exactly as `mashup score`
  encodes it, rows length-sorted and chunked by the backend's `batch_tokens`, the LM head at completion tokens only
  (as the backend computes it); the sample is repeated `donors_per_call` times so the passes have the mixed passes'
  shapes. Best of `repeats`, per donor-sample.
- `marginal`: exhaustive `mashup score` with `executor: local` on the first N₁, then the first N₂ donors (fresh
  folders); (t(N₂) − t(N₁)) / (N₂ − N₁) is one more donor's cost with the start-up taken out.
- ratio = marginal / limit (1.0 is the limit); `overhead` = marginal − limit: validation, hashing, reads, slot
  loads, PEFT's per-adapter work and the store, per donor.
Variants side by side, each adding one change of issue 22 to the last: `before` (cpus_per_actor: 1 and PEFT's
mixed-batch forward, the defaults until 2026-12-03), `+ all cores` (cpus_per_actor: auto), `+ segmented slots`
(lora_forward: segments, actors/lora_slots.py), `+ grouped slots` (lora_forward: grouped, mixed passes of equal
slices, each layer's deltas in two batched matmuls): today's defaults.

The cascade (engine defaults with `settle_k: 2`) and the screen (engine defaults) are run on the largest pool too,
and their wall-clock is set against their compute: forward-example equivalents (donor × example pairs scored, the
base's rows included; for the screen also the gradient, 3 forwards per example, and each donor's screen, r tokens'
worth) times the measured cost of one forward example (the limit / examples). `fixed` is the exhaustive jobs'
start-up (t(N) − N · marginal), taken out of the wall-clock in the second ratio.

Bases: `tiny` (the demo world's 4-layer Llama, the scale pool's donors), `wide` (a random Llama, hidden 512, 8
layers, vocab 32k, where the forward dominates; r16 q/k/v/o donors) and `smollm2` (SmolLM2-135M-Instruct, r16
q/k/v/o random donors; a synthetic few-shot task: the tokens, not their meaning, set the cost).

Usage: python -m bench.bench_roofline [--scale cpu|full] [--bases tiny,wide,smollm2] [--readme]
       → bench/results/roofline.json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import time
from pathlib import Path
from typing import Any, Iterator

from bench.readme import add_output_options, machine, publish, rendered_only

RESULTS = Path("bench/results/roofline.json")
README_BLOCK = "bench-roofline"
CACHE = Path(".cache/roofline")
SAMPLES = 64
DONORS = {"cpu": {"tiny": (64, 500), "wide": (8, 24), "smollm2": (4, 12)},
          "full": {"tiny": (64, 500, 2000), "wide": (64, 500, 2000), "smollm2": (64, 500, 2000)}}
VARIANTS = {  # each step of the speed work, from the old defaults to today's
    "before": {"cpus_per_actor": 1, "backend_options": {"lora_forward": "peft"}},
    "+ all cores": {"backend_options": {"lora_forward": "peft"}},
    "+ segmented slots": {"backend_options": {"lora_forward": "segments"}},
    "+ grouped slots (today)": {},
}
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
STRATEGIES = {"cascade": {"strategy": "cascade", "cascade": {"settle_k": 2}}, "screen": {"strategy": "screen"}}


def write_manifest(pool: Path, names: list[str]) -> Path:
    """A manifest of every donor folder in `pool` (relative paths), so `sub_manifest` can take the first n."""
    manifest = pool / "manifest.jsonl"
    if not manifest.exists():
        manifest.write_text("".join(json.dumps({"id": n, "path": n}) + "\n" for n in names))
    return manifest


def random_pool(base: Path, pool: Path, n: int) -> Path:
    """`n` r16 q/k/v/o PEFT donors with random factors on `base` (cached; built once for the largest n)."""
    from transformers import AutoModelForCausalLM

    from bench.world.tiny import write_lora_adapter

    names = [f"d{i:05d}" for i in range(n)]
    if all((pool / d / "adapter_model.safetensors").exists() for d in names):
        return write_manifest(pool, names)
    model = AutoModelForCausalLM.from_pretrained(str(base))
    for i, d in enumerate(names):
        if not (pool / d / "adapter_model.safetensors").exists():
            write_lora_adapter(base, pool / d, seed=i, r=16, alpha=32, target_modules=LORA_TARGETS, init_std=0.02,
                               base_model=model)
    (pool / "manifest.jsonl").unlink(missing_ok=True)
    return write_manifest(pool, names)


def world(name: str, n_max: int) -> dict[str, Any]:
    """(base folder, donor manifest, data file) of one base, built deterministically and cached."""
    from bench.world.tiny import write_task

    if name == "tiny":
        from bench.scale_pool import WORLD, build_pool

        return {"base": WORLD / "base", "manifest": build_pool(max(n_max, 2000)),
                "data": WORLD / "tasks" / "rev+dropf" / "train.jsonl"}
    root = CACHE / name
    if name == "wide":
        from bench.common import build_pool_world

        base = build_pool_world(1, SAMPLES, 32000, 512, 8) / "base"
    elif name == "smollm2":
        from bench.world.smollm2 import ensure

        base = ensure()
    else:
        raise SystemExit(f"unknown base {name!r}: use tiny, wide or smollm2")
    data = root / "task.jsonl"
    if not data.exists():
        root.mkdir(parents=True, exist_ok=True)
        write_task(data, SAMPLES, seed=0, op="sort", shots=3)
    return {"base": base, "manifest": random_pool(base, root / "pool", n_max), "data": data}


def score_config(w: dict[str, Any], manifest: Path, out: Path, **extra):
    from engine.scoring import ScoreConfig

    return ScoreConfig(base=str(w["base"]), donors=[str(manifest)], data=w["data"], out=out, samples=SAMPLES,
                       executor="local", **extra)


class PlainForward:
    """The limit: a plain forward over the sample as the scorer encodes and chunks it. Timed several times during
    the run, between the scoring jobs, because a shared machine's speed drifts by tens of percent over minutes:
    the fastest is the limit, and the spread is reported."""

    def __init__(self, cfg):
        import torch
        from transformers import AutoModelForCausalLM

        from engine.core.losses import chunk_by_tokens
        from engine.scoring.api import pin_base, prepare_sample

        cfg, fp = pin_base(cfg)
        self.sample = prepare_sample(cfg, fp)
        self.copies = cfg.donors_per_call
        self.batch_tokens = cfg.backend_opts().batch_tokens
        self.model = AutoModelForCausalLM.from_pretrained(cfg.base, dtype=torch.float32).eval()
        self.pad = self.model.config.pad_token_id or 0
        order = sorted((len(e.input_ids), i) for i, e in enumerate(self.sample.examples)) * self.copies
        self.chunks = list(chunk_by_tokens(sorted(order), lambda row: row[0], self.batch_tokens))
        self.samples: list[float] = []
        self.once()  # warm-up

    def once(self) -> float:
        import torch

        from engine.core.losses import completion_head, completion_stats, left_pad, model_inputs

        t0 = time.perf_counter()
        with torch.inference_mode():
            for chunk in self.chunks:
                batch = left_pad([self.sample.examples[i] for _, i in chunk], self.pad)
                with completion_head(self.model, batch):
                    logits = self.model(**model_inputs(batch)).logits
                completion_stats(logits, batch)
        return (time.perf_counter() - t0) / self.copies

    def time(self, repeats: int) -> None:
        self.samples.append(min(self.once() for _ in range(repeats)))

    def summary(self) -> dict[str, Any]:
        import torch

        return {"seconds": min(self.samples), "samples_s": self.samples, "spread": max(self.samples) / min(self.samples),
                "examples": len(self.sample.examples), "completion_tokens": self.sample.n_tokens,
                "tokens": sum(len(e.input_ids) for e in self.sample.examples), "threads": torch.get_num_threads(),
                "batch_tokens": self.batch_tokens, "passes_per_call": len(self.chunks)}


# The per-donor work that is not a forward pass, timed where the local executor runs it (in this process): the
# scorer's preparation (validate, stat, one read for the hash, the finiteness check and the load), the backend's
# loads into its slots (a first slot layout's build included: it cancels in the marginal), and the driver's record
# of the rows (the store). Bench-side wrappers: the engine carries no timers for this.
WORK = (("actors.scorer", "DonorScorer", "_prepare"), ("actors.backends.hf", "HFBackend", "_ensure"),
        ("engine.scoring.pool", "ActorPoolRunner", "_record"))


@contextlib.contextmanager
def timed_work() -> Iterator[dict[str, float]]:
    """Seconds spent in each WORK method while the block runs."""
    import functools
    import importlib

    spent: dict[str, float] = {m: 0.0 for _, _, m in WORK}
    saved = []
    for module, cls_name, method in WORK:
        cls = getattr(importlib.import_module(module), cls_name)
        original = getattr(cls, method)

        @functools.wraps(original)
        def wrapper(*args, __original=original, __method=method, **kwargs):
            t0 = time.perf_counter()
            try:
                return __original(*args, **kwargs)
            finally:
                spent[__method] += time.perf_counter() - t0

        saved.append((cls, method, original))
        setattr(cls, method, wrapper)
    try:
        yield spent
    finally:
        for cls, method, original in saved:
            setattr(cls, method, original)


def run_job(w: dict[str, Any], n: int, extra: dict[str, Any], tag: str):
    """Local scoring of the first n donors in a fresh folder: (its wall-clock, its summary, the seconds of its
    per-donor work that is not a forward pass); a failed donor ends the bench, since its cost would be missing."""
    from bench.scale_pool import sub_manifest
    from engine.scoring import score

    out = CACHE / "runs" / f"{tag}-n{n}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = score_config(w, sub_manifest(w["manifest"], n), out, **extra)
    t0 = time.perf_counter()
    with timed_work() as work:
        summary = score(cfg)
    seconds = time.perf_counter() - t0
    if summary.failed:
        raise SystemExit(f"{tag}: {summary.failed} donors failed: {dict(list(summary.failures.items())[:3])}")
    return seconds, summary, dict(work)


def strategy_job(w: dict[str, Any], n: int, name: str, tag: str) -> dict[str, Any]:
    """One cascade or screen job on the first n donors in a fresh folder: its wall-clock and its compute in
    forward-example equivalents."""
    seconds, summary, _ = run_job(w, n, STRATEGIES[name], tag)
    record = json.loads((summary.out / ("cascade.json" if name == "cascade" else "screen.json")).read_text())
    examples = record["examples"]
    fwd = summary.donor_examples + examples  # the base: scored on the whole sample once (nested prefixes)
    if name == "screen":
        first = json.loads(w["manifest"].read_text().splitlines()[0])
        rank = json.loads((w["manifest"].parent / first["path"] / "adapter_config.json").read_text())["r"]
        fwd += 3 * examples + n * rank / (record["tokens"] / examples)
    return {"donors": n, "seconds": seconds, "forward_example_equiv": fwd, "examples": examples}


def against_compute(job: dict[str, Any], limit_s: float, fixed_s: float) -> dict[str, Any]:
    """A strategy's wall-clock against its compute at the limit's speed, with and without the start-up."""
    compute_s = job["forward_example_equiv"] * limit_s / job["examples"]
    return {**job, "compute_s": compute_s, "fraction_of_exhaustive": job["forward_example_equiv"] / (
            (job["donors"] + 1) * job["examples"]), "ratio": job["seconds"] / compute_s,
            "ratio_without_fixed": (job["seconds"] - fixed_s) / compute_s, "fixed_s": fixed_s}


def against_the_limit(seconds: dict[int, float], limit_s: float,
                      work: dict[int, dict[str, float]] | None = None) -> dict[str, Any]:
    """Job seconds by pool size → one more donor's seconds between consecutive sizes (the last pair is the
    figure: the start-up cancels, and the largest pools weigh the per-donor work most), its multiple of the limit,
    and the overhead above it; with `work` (timed_work's seconds by pool size), the overhead's part that is not a
    forward pass, per WORK method, the same marginal way. The rest of the overhead is in the forward: the LoRA's own
    FLOPs (a quarter of each adapted module's at hidden 128, r 16) and the hooks that add them."""
    ns = sorted(seconds)
    steps = [(seconds[b] - seconds[a]) / (b - a) for a, b in zip(ns, ns[1:])]
    out = {"seconds": {str(n): seconds[n] for n in ns}, "marginal_s": steps[-1], "marginal_by_step": steps,
           "ratio": steps[-1] / limit_s, "overhead_ms": 1000 * (steps[-1] - limit_s)}
    if work:
        a, b = ns[-2], ns[-1]
        out["work_ms"] = {m: 1000 * (work[b][m] - work[a][m]) / (b - a) for m in work[b]}
        out["not_forward_ms"] = sum(out["work_ms"].values())
    return out


def measure(name: str, ns: tuple[int, ...], repeats: int) -> dict[str, Any]:
    """Every variant at every pool size, interleaved (size-major) so that the machine's drift hits them alike, with
    the limit timed before each size and at the end."""
    from transformers import AutoConfig

    from bench.scale_pool import sub_manifest

    w = world(name, max(ns))
    limit = PlainForward(score_config(w, sub_manifest(w["manifest"], ns[0]), CACHE / "runs" / "limit"))
    seconds: dict[str, dict[int, float]] = {v: {} for v in VARIANTS}
    work: dict[str, dict[int, dict[str, float]]] = {v: {} for v in VARIANTS}
    for n in ns:
        limit.time(repeats)
        for i, (v, extra) in enumerate(VARIANTS.items()):
            seconds[v][n], _, work[v][n] = run_job(w, n, extra, f"{name}-v{i}")
    jobs = {name: strategy_job(w, max(ns), name, f"{name}-s-{name}") for name in STRATEGIES}
    limit.time(repeats)
    lim = limit.summary()
    c = AutoConfig.from_pretrained(str(w["base"]))
    out = {"shape": {"hidden": c.hidden_size, "layers": c.num_hidden_layers, "vocab": c.vocab_size,
                     "intermediate": c.intermediate_size}, "donors": list(ns), "limit": lim, "variants": {}}
    for v, secs in seconds.items():
        out["variants"][v] = r = against_the_limit(secs, lim["seconds"], work[v])
        print(f"{name} {v}: {1000 * r['marginal_s']:.1f} ms/donor vs limit {1000 * lim['seconds']:.1f} ms "
              f"({r['ratio']:.2f}x)", flush=True)
    today = out["variants"][list(VARIANTS)[-1]]
    fixed = today["seconds"][str(max(ns))] - max(ns) * today["marginal_s"]
    out["strategies"] = {k: against_compute(j, lim["seconds"], fixed) for k, j in jobs.items()}
    for k, r in out["strategies"].items():
        print(f"{name} {k}: {r['seconds']:.1f} s vs compute {r['compute_s']:.1f} s ({r['ratio']:.2f}x; "
              f"{r['ratio_without_fixed']:.2f}x without the {fixed:.1f} s start-up)", flush=True)
    return out


def _work(r: dict[str, Any]) -> str:
    """The per-donor work that is not a forward pass, and its parts (prepare / load / record)."""
    if "not_forward_ms" not in r:
        return "—"
    parts = " / ".join(f"{r['work_ms'][m]:.1f}" for _, _, m in WORK)
    return f"{r['not_forward_ms']:.1f} ms ({parts})"


def render(res: dict[str, Any]) -> str:
    lines = [f"{SAMPLES} examples per donor, `executor: local`, exhaustive; marginal = (t(N₂) − t(N₁)) / (N₂ − N₁) between the two largest pool sizes, so "
             "start-up is out; limit = a plain transformers forward over the same tokens and pass shapes, same "
             "threads, the fastest of its timings between the jobs (their spread shows how much the machine drifted; "
             "variants run interleaved).", "",
             "| base | donors | tokens / donor | limit (plain forward) | variant | marginal per donor | × the limit | "
             "overhead per donor | of which not a forward pass |", "|---|---|---|---|---|---|---|---|---|"]
    for name, b in res["bases"].items():
        s, lim = b["shape"], b["limit"]
        spread = f", spread {lim['spread']:.2f}×" if "spread" in lim else ", timed once"
        for v, r in b["variants"].items():
            lines.append(f"| {name} (h{s['hidden']}, {s['layers']} layers, vocab {s['vocab']}) | "
                         f"{', '.join(map(str, b['donors']))} | {lim['tokens']} ({lim['completion_tokens']} scored) | "
                         f"{1000 * lim['seconds']:.1f} ms ({lim['threads']} threads{spread}) | {v} | "
                         f"{1000 * r['marginal_s']:.1f} ms | **{r['ratio']:.2f}×** | {r['overhead_ms']:.1f} ms | "
                         f"{_work(r)} |")
    strategies = [(name, k, r) for name, b in res["bases"].items() for k, r in b.get("strategies", {}).items()]
    if strategies:
        lines += ["", "| base | strategy | donors | compute (fwd-example equiv.) | share of exhaustive | compute at the "
                  "limit | wall-clock | × compute | × compute, start-up out |", "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {name} | {k} | {r['donors']} | {r['forward_example_equiv']:,.0f} | "
                  f"{100 * r['fraction_of_exhaustive']:.1f}% | {r['compute_s']:.1f} s | {r['seconds']:.1f} s | "
                  f"**{r['ratio']:.2f}×** | {r['ratio_without_fixed']:.2f}× (start-up {r['fixed_s']:.1f} s) |"
                  for name, k, r in strategies]
    runs = {}
    for name, b in res["bases"].items():
        m = b.get("measured", res["meta"])
        runs.setdefault((m["date"], m["machine"], m["command"]), []).append(name)
    lines += [""] + [f"- {', '.join(names)}: measured {date} on {mach} with `{cmd}`."
                     for (date, mach, cmd), names in runs.items()]
    lines += ["", "Not a forward pass: the scorer's preparation of each donor (validate, stat, one read for its hash, "
              "finiteness check and load) / its loads into the slots / the driver's record of its row, timed around "
              "those methods in the same jobs, marginal like the rest; the remaining overhead is inside the forward "
              "(the LoRA's own FLOPs and the hooks that add them).", "", "`before`: `cpus_per_actor: 1` (the old default: one torch thread however many cores) and PEFT's "
              "mixed-batch forward; `+ all cores`: `cpus_per_actor: auto`; `+ segmented slots`: each donor's rows one "
              "slice of the pass, its LoRA delta added by a hook (`lora_forward: segments`); `+ grouped slots`: every donor of "
              "a mixed pass over the same examples, the deltas of all its slices in two batched matmuls per layer "
              "(`lora_forward: grouped`), today's defaults. A base measured before a variant existed has no row "
              "for it."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--scale", choices=sorted(DONORS), default="cpu")
    ap.add_argument("--bases", default="tiny,wide,smollm2")
    ap.add_argument("--donors", default="", help="pool sizes for every base (e.g. 4,8), instead of the scale's")
    ap.add_argument("--repeats", type=int, default=3)
    add_output_options(ap, RESULTS)
    args = ap.parse_args(argv)
    if rendered_only(args, README_BLOCK, render):
        return
    bases = [b for b in args.bases.split(",") if b]
    sizes = tuple(int(n) for n in args.donors.split(",") if n)
    if sizes and (len(sizes) < 2 or list(sizes) != sorted(set(sizes))):
        raise SystemExit("--donors: at least two increasing pool sizes, e.g. 4,8")
    command = (f"python -m bench.bench_roofline --scale {args.scale} --bases {','.join(bases)}"
               + (f" --donors {args.donors}" if sizes else ""))
    measured = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "command": command}
    # a run of some bases keeps the others' figures (each base says when and how it was measured)
    old = json.loads(args.results.read_text()) if args.results.exists() else {"bases": {}}
    fresh = {b: {**measure(b, sizes or DONORS[args.scale][b], args.repeats), "measured": measured} for b in bases}
    kept = {b: {"measured": old.get("meta"), **r} for b, r in old.get("bases", {}).items()}
    res = {"meta": measured, "bases": {**kept, **fresh}}
    publish(res, args, README_BLOCK, render)


if __name__ == "__main__":
    main()
