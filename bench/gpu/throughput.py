"""Part 2, `throughput`: the `hf` backend vs the naive PEFT loop on the device (same base, donors and sample, one
process), forward FLOP/s over a plain matmul's, and where the time goes.

Older variants of the backend (`VARIANTS`) are built from its public `HFOptions` (`passes`, `slot_dtype`), not by
subclassing it. The breakdown no longer times adapter loads and `set_adapter` switches one by one (that needed
device syncs inside the backend): it scores the same donors twice, first loading them, then resident, and reports
the difference as loading time; switches are counted in the resident time and show up in the profile.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import torch

from bench.gpu.common import big_world, encode, free, log, sync, time_matmul


def padded_tokens(lengths: list[int], n_donors_per_call: int, budget: int) -> int:
    """Tokens the hf backend actually pushes through the model for one call of `n` donors (padding included)."""
    from engine.core.losses import chunk_by_tokens

    rows = sorted(lengths * n_donors_per_call)
    return sum(max(c) * len(c) for c in chunk_by_tokens(rows, lambda x: x, budget))


def naive_gpu_loop(base: Path, sample, donors: list[Path], device: str, dtype) -> tuple[float, float, dict]:
    """bench/common.py's naive loop on the device: per donor PeftModel.from_pretrained → one right-padded forward of
    the whole sample with full logits → unload. Base loaded once; one warm-up forward of the base, untimed."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype).to(device).eval()
    startup = time.perf_counter() - t0
    length = max(len(e.input_ids) for e in sample.examples)
    ids = torch.zeros((len(sample.examples), length), dtype=torch.long)
    mask = torch.zeros_like(ids)
    target_mask = torch.zeros((len(sample.examples), length - 1), dtype=torch.bool)
    for i, e in enumerate(sample.examples):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        mask[i, : len(e.input_ids)] = 1
        target_mask[i, e.n_prompt - 1: len(e.input_ids) - 1] = True
    ids, mask, target_mask = ids.to(device), mask.to(device), target_mask.to(device)

    def loss_of(m) -> float:
        with torch.inference_mode():
            logits = m(input_ids=ids, attention_mask=mask).logits.float()
            logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, ids[:, 1:, None])[..., 0]
            return float(-(logp.double() * target_mask).sum()) / sample.n_tokens

    loss_of(model)  # warm-up, untimed
    sync(device)
    losses = {}
    t0 = time.perf_counter()
    for d in donors:
        peft_model = PeftModel.from_pretrained(model, str(d))
        losses[d.name] = loss_of(peft_model)
        model = peft_model.unload()
    sync(device)
    return startup, time.perf_counter() - t0, losses


# The hf backend as shipped ("new"), or as it was before the two GPU fixes in docs/gpu.md, through public options:
# "fp32_slots" undoes the bf16 slots (PEFT's float32 adapters); "original" also restores the former ordering (every
# pass mixes donors, rows sorted by length over all donors); "by_donor" forces one donor per pass for a small sample.
VARIANTS: dict[str, dict] = {"new": {}, "fp32_slots": {"slot_dtype": "float32"},
                             "original": {"passes": "mixed", "slot_dtype": "float32"}, "by_donor": {"passes": "by_donor"}}


def _score_all(backend, reqs, sample, per_call: int, device: str) -> tuple[float, dict[str, float]]:
    """Score `reqs` in calls of `per_call` donors, as the actors do; wall seconds (device synced) and losses."""
    losses = {}
    sync(device)
    t0 = time.perf_counter()
    for i in range(0, len(reqs), per_call):
        for s in backend.score(reqs[i:i + per_call], sample):
            assert s.error is None, (s.donor, s.error)
            losses[s.donor] = s.loss
    sync(device)
    return time.perf_counter() - t0, losses


def ours(base: Path, sample, donors: list[Path], device: str, dtype: str, per_call: int, budget: int,
         variant: str = "new", profile: Path | None = None):
    """The hf backend on `donors`, adapter loading included: (startup, seconds, losses, peak GiB, extra). With
    `profile`, `extra` has the same donors rescored while resident (so the loading share is the difference; all
    of them must fit in max_resident = 2 x per_call) and one resident call under torch.profiler."""
    from actors.backends.base import BASE_REQUEST, DonorRequest
    from actors.backends.hf import HFBackend, HFOptions

    t0 = time.perf_counter()
    backend = HFBackend(str(base), HFOptions(device=device, dtype=dtype, max_resident=2 * per_call,
                                             batch_tokens=budget, **VARIANTS[variant]))
    startup = time.perf_counter() - t0
    [warm] = backend.score([BASE_REQUEST], sample)  # warm-up on the base, untimed (as bench_backends.py)
    assert warm.error is None, warm.error
    reqs = [DonorRequest(d.name, str(d), i + 1) for i, d in enumerate(donors)]
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    seconds, losses = _score_all(backend, reqs, sample, per_call, device)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    extra = {}
    if profile is not None:
        assert len(reqs) <= 2 * per_call, "the resident rescoring needs every donor resident"
        resident, _ = _score_all(backend, reqs, sample, per_call, device)
        extra = {"resident_s (forwards, switches, padding, loss)": resident,
                 "load_s (first calls minus resident calls)": seconds - resident,
                 "profile": profile_call(backend, reqs[-per_call:], sample, device, profile)}
    del backend
    free(device)
    return startup, seconds, losses, peak, extra


def profile_call(backend, reqs, sample, device: str, path: Path) -> dict:
    """One score call of resident donors under torch.profiler: wall time vs summed device-kernel time."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    backend.score(reqs, sample)  # resident and warm
    sync(device)
    with profile(activities=acts) as prof:
        t0 = time.perf_counter()
        backend.score(reqs, sample)
        sync(device)
        wall = time.perf_counter() - t0
    events = prof.key_averages()
    kernel_us = sum(e.self_device_time_total for e in events if e.device_type.name == "CUDA")
    sort = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    table = events.table(sort_by=sort, row_limit=25)
    path.write_text(table)
    top = sorted(events, key=lambda e: -(e.self_device_time_total if device.startswith("cuda") else
                                         e.self_cpu_time_total))[:10]
    return {"donors": len(reqs), "wall_s_under_profiler": wall, "device_kernel_s": kernel_us / 1e6,
            "device_busy_share": kernel_us / 1e6 / wall if wall else None,
            "top_ops": [{"name": e.key[:80], "count": e.count, "self_device_ms": e.self_device_time_total / 1e3,
                         "self_cpu_ms": e.self_cpu_time_total / 1e3} for e in top],
            "table_file": path.name}


def part_throughput(work: Path, p: dict, device: str) -> dict:
    """hf vs the naive loop for every (donors per call, batch_tokens, variant) in `p["configs"]`, in FLOP terms."""
    from transformers import AutoConfig

    t0 = time.perf_counter()
    w = big_world(work / "big", p, device)
    build_s = time.perf_counter() - t0
    sample = encode(w["base"], w["task"])
    cfg = AutoConfig.from_pretrained(str(w["base"]))
    H, I, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    kv = cfg.num_key_value_heads * (H // cfg.num_attention_heads)
    body = L * (2 * H * H + 2 * H * kv + 3 * H * I)  # q,o + k,v + gate,up,down: matmul weights per layer
    lengths = [len(e.input_ids) for e in sample.examples]
    n_real, n_compl, n = sum(lengths), sample.n_tokens, len(w["pool"])
    useful = n * (2 * body * n_real + 2 * H * V * n_compl)  # per donor: body on real tokens, head on completions
    log(f"throughput: world ready in {build_s:.1f}s; {body / 1e6:.0f}M body + {H * V / 1e6:.0f}M head params, "
        f"{n} donors x {len(lengths)} examples ({n_real} tokens, {n_compl} completion)")
    dtype = "bfloat16" if device.startswith("cuda") else "float32"
    tdtype = getattr(torch, dtype)
    peak_mm = time_matmul(p["matmul"], p["matmul"], p["matmul"], device)
    out: dict = {"world": {"hidden": H, "intermediate": I, "layers": L, "heads": cfg.num_attention_heads, "vocab": V,
                           "params_total_M": round((body + 2 * H * V) / 1e6, 1), "params_body_M": round(body / 1e6, 1),
                           "donors": n, "lora": "r16 alpha32 q/k/v/o (float32 weights, as PEFT saves them)",
                           "examples": len(lengths), "tokens_per_pass": n_real, "completion_tokens": n_compl,
                           "seq_len_min_mean_max": [min(lengths), round(n_real / len(lengths), 1), max(lengths)],
                           "dtype": dtype, "build_s": round(build_s, 1)},
                 "flop_count": "useful forward FLOPs = donors x (2 x body matmul params x real tokens + 2 x hidden x "
                               "vocab x completion tokens); attention scores/softmax, LoRA (~0.5% here), norms and "
                               "padding not counted",
                 "useful_tflop_per_pass": useful / 1e12, "matmul_peak": peak_mm}
    naive_start, naive_s, naive_losses = naive_gpu_loop(w["base"], sample, w["pool"], device, tdtype)
    free(device)
    out["naive_peft"] = {"startup_s": naive_start, "seconds": naive_s, "donors_per_s": n / naive_s,
                         "useful_tflops": useful / naive_s / 1e12}
    log(f"naive PEFT loop: {n / naive_s:.2f} donors/s ({naive_s:.1f}s)")
    runs = []
    for per_call, budget, variant in p["configs"]:
        mm = time_matmul(budget, H, I, device)  # the MLP up-projection of one full forward chunk
        start, secs, losses, peak, _ = ours(w["base"], sample, w["pool"], device, dtype, per_call, budget, variant)
        computed = n // per_call * padded_tokens(lengths, per_call, budget) + (
            padded_tokens(lengths, n % per_call, budget) if n % per_call else 0)
        flops = useful / secs
        passes = VARIANTS[variant].get("passes", "auto")
        mixed = passes == "mixed" or (passes == "auto" and n_real < budget)
        path = "every pass mixes donors (adapter_names)" if mixed else "one donor per pass"
        slots = "float32 (PEFT default)" if VARIANTS[variant].get("slot_dtype") == "float32" else dtype
        run = {"variant": variant, "donors_per_call": per_call, "batch_tokens": budget, "path": path,
               "slot_dtype": slots, "startup_s": start, "seconds": secs,
               "donors_per_s": n / secs, "ratio_vs_naive": naive_s / secs, "useful_tflops": flops / 1e12,
               "matmul_same_shape": mm, "efficiency_vs_same_shape_matmul": flops / (mm["tflops"] * 1e12),
               "efficiency_vs_peak_matmul": flops / (peak_mm["tflops"] * 1e12),
               "padded_tokens_computed": computed, "padding_overhead": computed / (n * n_real) - 1,
               "peak_memory_gib": peak,
               "max_abs_loss_diff_vs_naive": max(abs(losses[k] - v) for k, v in naive_losses.items())}
        runs.append(run)
        log(f"hf {variant} per_call={per_call} batch_tokens={budget} [{path}, slots {slots}]: "
            f"{run['donors_per_s']:.2f} donors/s, "
            f"x{run['ratio_vs_naive']:.2f} naive, {run['useful_tflops']:.0f} TFLOP/s = "
            f"{run['efficiency_vs_same_shape_matmul']:.1%} of a {budget}x{H}x{I} matmul "
            f"({mm['tflops']:.0f}), max|loss-naive| {run['max_abs_loss_diff_vs_naive']:.2e}")
    out["hf"] = runs
    out["small_sample"] = _small_sample(w, sample, p, device, dtype, useful_per_token=(2 * body, 2 * H * V))
    out["breakdown"] = _breakdown(work, w, sample, p, device, dtype)
    best = max(runs, key=lambda r: r["donors_per_s"])
    out["summary"] = {"best_hf_donors_per_s": best["donors_per_s"], "naive_donors_per_s": n / naive_s,
                      "ratio_vs_naive": best["ratio_vs_naive"], "best_config": [best["donors_per_call"],
                                                                                 best["batch_tokens"]],
                      "efficiency_vs_same_shape_matmul": best["efficiency_vs_same_shape_matmul"],
                      "naive_efficiency_vs_peak_matmul": out["naive_peft"]["useful_tflops"] / peak_mm["tflops"]}
    return out


def _small_sample(w: dict, sample, p: dict, device: str, dtype: str, useful_per_token: tuple[int, int]) -> dict:
    """A small sample (fewer tokens per donor than one pass) takes the mixed path: hf vs naive on a few donors, and
    hf with one donor per pass forced."""
    tdtype = getattr(torch, dtype)
    k, m = p["small_sample"]
    small = type(sample)(sample.examples[:m], sample.fingerprint)
    n_s, real_s = min(k, len(w["pool"])), sum(len(e.input_ids) for e in small.examples)
    useful_s = n_s * (useful_per_token[0] * real_s + useful_per_token[1] * small.n_tokens)
    _, naive_small_s, naive_small = naive_gpu_loop(w["base"], small, w["pool"][:n_s], device, tdtype)
    free(device)
    _, ours_small_s, ours_small, _, _ = ours(w["base"], small, w["pool"][:n_s], device, dtype, 8, 8192)
    _, by_small_s, by_small, _, _ = ours(w["base"], small, w["pool"][:n_s], device, dtype, 8, 8192, "by_donor")
    res = {"donors": n_s, "examples": m, "tokens_per_donor": real_s, "batch_tokens": 8192, "donors_per_call": 8,
           "path": "several donors per pass (adapter_names)", "naive_donors_per_s": n_s / naive_small_s,
           "hf_donors_per_s": n_s / ours_small_s, "ratio_vs_naive": naive_small_s / ours_small_s,
           "hf_forced_one_donor_per_pass_donors_per_s": n_s / by_small_s,
           "hf_useful_tflops": useful_s / ours_small_s / 1e12,
           "max_abs_loss_diff_vs_naive": max(abs(ours_small[k] - v) for k, v in naive_small.items()),
           "max_abs_loss_diff_forced_vs_mixed": max(abs(by_small[k] - v) for k, v in ours_small.items())}
    log(f"small sample ({m} examples, {n_s} donors): hf {n_s / ours_small_s:.2f} donors/s (one donor per pass "
        f"forced: {n_s / by_small_s:.2f}) vs naive {n_s / naive_small_s:.2f} (x{naive_small_s / ours_small_s:.2f})")
    return res


def _breakdown(work: Path, w: dict, sample, p: dict, device: str, dtype: str) -> dict:
    """Where the time goes (shipped code, first config): the same donors scored again once resident (the difference
    is adapter loading), then one call of resident donors under the profiler (profile.txt, copied to $OUT)."""
    per_call, budget = p["configs"][0][:2]
    _, t_secs, _, _, extra = ours(w["base"], sample, w["pool"][:2 * per_call], device, dtype, per_call, budget,
                                  profile=work / "profile.txt")
    res = {"donors": 2 * per_call, "donors_per_call": per_call, "batch_tokens": budget, "seconds": t_secs, **extra}
    if os.environ.get("OUT"):
        shutil.copy(work / "profile.txt", Path(os.environ["OUT"]) / "profile.txt")
    log(f"breakdown: {json.dumps({k: v for k, v in res.items() if k != 'profile'}, default=str)}; "
        f"device busy {extra['profile']['device_busy_share']}")
    return res
