"""Part 1, `parity`: the `hf` backend on the device against an independent transformers+PEFT forward
(`tests.adapters.peft_reference_loss`, float32 on the CPU), in float32 and bfloat16, for three batchings."""
from __future__ import annotations

import time
from pathlib import Path

from bench.gpu.common import encode, free, log, small_world


def part_parity(work: Path, p: dict, device: str) -> dict:
    from actors.backends.base import BASE_REQUEST, DonorRequest
    from actors.backends.hf import HFBackend, HFOptions
    from tests.adapters import peft_reference_loss

    w = small_world(work / "small", p)
    sample = encode(w["base"], w["task"])
    reqs = [BASE_REQUEST] + [DonorRequest(d.name, str(d), i + 1) for i, d in enumerate(w["pool"])]
    t0 = time.perf_counter()
    ref = {r.donor: peft_reference_loss(w["base"], r.path or None, sample) for r in reqs}
    log(f"parity: CPU float32 references for {len(reqs)} in {time.perf_counter() - t0:.1f}s")
    out: dict = {"world": {**p, "donors": len(reqs) - 1, "families": "q/v r8, q/k/v/o r4, gate/up/down r16",
                           "n_tokens": sample.n_tokens,
                           "reference": "tests.adapters.peft_reference_loss: PeftModel.from_pretrained per donor, "
                                        "float32 on CPU, one unpadded example at a time, full logits"}}
    per_donor = sum(len(e.input_ids) for e in sample.examples)
    variants = {  # name -> (options, what it exercises)
        "mixed": (dict(max_resident=8, batch_tokens=4 * per_donor), "several donors per forward (adapter_names)"),
        "by_donor": (dict(max_resident=8, batch_tokens=max(64, per_donor // 4)),
                     "one active adapter per forward (sample >= batch_tokens per donor)"),
        "alone": (dict(max_resident=2, batch_tokens=4 * per_donor, mixed_batch=False), "one donor per score call"),
    }
    out["world"]["tokens_per_donor"] = per_donor
    out["variants"] = {k: {**v[0], "what": v[1]} for k, v in variants.items()}
    for dtype in ("float32", "bfloat16"):
        scored = {}
        for name, (opts, _) in variants.items():
            backend = HFBackend(str(w["base"]), HFOptions(device=device, dtype=dtype, **opts))
            if name == "alone":
                scored[name] = [backend.score([r], sample)[0] for r in reqs]
            else:
                scored[name] = backend.score(reqs, sample)
            del backend
            free(device)
        errors = [f"{name}: {s.donor}: {s.error}" for name, ss in scored.items() for s in ss if s.error]
        rows = {}
        for k, r in enumerate(reqs):
            rl, ra = ref[r.donor]
            m = scored["mixed"][k]
            rows[r.donor] = {"reference_loss": rl, "reference_token_accuracy": ra,
                             **{f"{name}_loss": ss[k].loss for name, ss in scored.items()},
                             **{f"{name}_abs_diff": abs(ss[k].loss - rl) for name, ss in scored.items()},
                             **{f"{name}_token_accuracy": ss[k].token_accuracy for name, ss in scored.items()},
                             "mixed_vs_alone_abs_diff": abs(m.loss - scored["alone"][k].loss),
                             "by_donor_vs_mixed_abs_diff": abs(scored["by_donor"][k].loss - m.loss)}
        max_ref = max(v[f"{name}_abs_diff"] for v in rows.values() for name in variants)
        max_alone = max(v["mixed_vs_alone_abs_diff"] for v in rows.values())
        max_by = max(v["by_donor_vs_mixed_abs_diff"] for v in rows.values())
        max_acc = max(abs(v[f"{name}_token_accuracy"] - v["reference_token_accuracy"])
                      for v in rows.values() for name in variants)
        tol = 1e-4 if dtype == "float32" else 5e-2
        tol_alone = 1e-4 if dtype == "float32" else 2e-2
        out[dtype] = {"errors": errors, "max_abs_loss_diff_vs_reference": max_ref,
                      "max_abs_token_accuracy_diff_vs_reference": max_acc,
                      "max_abs_loss_diff_mixed_vs_alone": max_alone, "max_abs_loss_diff_by_donor_vs_mixed": max_by,
                      "tolerance_vs_reference": tol, "tolerance_between_variants": tol_alone,
                      "pass": not errors and max_ref < tol and max(max_alone, max_by) < tol_alone,
                      "per_donor": rows}
        log(f"parity {dtype}: max |loss - ref| {max_ref:.2e} (tol {tol}), max |mixed - alone| {max_alone:.2e}, "
            f"max |by_donor - mixed| {max_by:.2e}, max |acc - ref| {max_acc:.3f}, errors {len(errors)}")
    return out
