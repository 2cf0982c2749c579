"""bench_mwa_donors: a reduced run (2 donors, 2 checkpoints each, a few steps, 1 seed) that only has to complete and
write its JSON, the pools' donors checked against the MWA formula computed directly from the donor runs' own logs,
and the report's paired comparison on known inputs."""
import json
import math
import statistics

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from bench.bench_mwa_donors import load_config, run_bench
from bench.mwa_donors_report import compare, paired_delta
from bench.world.build import WorldSpec, build


@pytest.fixture(scope="module")
def donors_world(tmp_path_factory):
    spec = WorldSpec(name="smoke", hidden=32, layers=2, heads=2, pretrain_steps=20, pretrain_batch=16,
                     targets=["rev+dropf"], donor_tasks=["rev+id", "sort+dropf"], donor_steps=2, donor_batch=4,
                     train_rows=48, val_rows=12, eval_rows=12)
    return build(spec, tmp_path_factory.mktemp("world"))


def _window_losses(run_dir, steps):
    """Mean logged train loss over (previous checkpoint, checkpoint], read straight from the run's log."""
    log = pd.read_parquet(run_dir / "log.parquet")
    train = log[log["event"] == "train"].set_index("step")["loss"]
    out, prev = [], 0
    for s in steps:
        out.append(float(train.loc[(train.index > prev) & (train.index <= s)].mean()))
        prev = s
    return out


@pytest.mark.slow
def test_bench_mwa_donors_smoke_completes_and_pools_hold_the_mwa_merges(donors_world, tmp_path, ray_local):
    out = tmp_path / "runs"
    cfg = load_config([f"world_dir={donors_world}", f"out={out}", f"results={tmp_path / 'mwa_donors.json'}",
                       "target=rev+dropf", "donors=[rev+id, sort+dropf]", "save_every=2", "donor.steps=4",
                       "donor.batch_size=4", "seeds=[0]", "score.samples=16", "finetune.steps=2",
                       "finetune.batch_size=4", "finetune.warmup_steps=0", "finetune.eval_every=2"])
    summary = run_bench(cfg)
    data = json.loads(summary.read_text())
    assert set(data["pools"]) == {"final", "mwa", "uniform"}
    for pool in data["pools"].values():
        assert len(pool["picks"]) == 2 and set(pool["arms"]) >= {"mashup"}
    assert "scratch" in data["pools"]["final"]["arms"]
    assert "| pool | picks" in (tmp_path / "mwa_donors.md").read_text()

    # Each pool's donor is what it claims: final = the last checkpoint; mwa / uniform = Σ wᵢ Aᵢ, Σ wᵢ Bᵢ with
    # wᵢ ∝ Lᵢ^-1 (p = 1) / 1/n, the losses recomputed here from the log, the tensors read from the checkpoints.
    manifests = {p: {json.loads(line)["id"]: json.loads(line) for line in (out / f"manifest-{p}.jsonl").read_text().splitlines()}
                 for p in ("final", "mwa", "uniform")}
    for task in ("rev+id", "sort+dropf"):
        run_dir = out / "donors" / task
        steps = [2, 4]
        ckpts = [load_file(run_dir / "checkpoints" / f"step-{s:06d}" / "adapter_model.safetensors") for s in steps]
        losses = _window_losses(run_dir, steps)
        assert data["donors"][task]["train_loss"] == pytest.approx(losses)
        inv = [1 / x for x in losses]
        weights = {"mwa": [w / sum(inv) for w in inv], "uniform": [0.5, 0.5]}
        assert data["donors"][task]["mwa_weights"] == pytest.approx(weights["mwa"])
        final = load_file(out / manifests["final"][task]["path"] / "adapter_model.safetensors")
        assert all(torch.equal(final[k], ckpts[-1][k]) for k in ckpts[-1])
        for pool, w in weights.items():
            merged = load_file(out / manifests[pool][task]["path"] / "adapter_model.safetensors")
            assert set(merged) == set(ckpts[0])
            for k in merged:
                want = sum(wi * c[k].double() for wi, c in zip(w, ckpts))
                torch.testing.assert_close(merged[k].double(), want, rtol=1e-5, atol=1e-7)
    assert run_bench(cfg) == summary  # cached: donors, merges, scores and finetunes are all reused


def test_paired_delta_on_known_inputs():
    d = paired_delta([0.90, 0.80, 0.85], [0.80, 0.80, 0.80])
    deltas = [10.0, 0.0, 5.0]
    assert d["mean_pp"] == pytest.approx(statistics.mean(deltas))
    assert d["std_pp"] == pytest.approx(statistics.stdev(deltas))
    assert d["se_pp"] == pytest.approx(statistics.stdev(deltas) / math.sqrt(3))
    assert d["beyond_noise"] is False  # 5 pp < 2 × 2.89 pp
    assert paired_delta([0.9, 0.91, 0.92], [0.8, 0.8, 0.8])["beyond_noise"] is True  # +11 ± 1 pp
    assert paired_delta([0.805, 0.805], [0.8, 0.8])["beyond_noise"] is False  # consistent but under 1 pp
    with pytest.raises(ValueError):
        paired_delta([0.9], [0.8, 0.8])


def test_compare_names_changed_picks():
    def pool(picks, held):
        return {"picks": [{"donor": d, "loss": 1.0, "weight": 0.5} for d in picks],
                "arms": {"mashup": {"heldout_per_seed": held}}}

    cmp = compare({"final": pool(["a", "b"], [0.8, 0.7]), "mwa": pool(["b", "a"], [0.8, 0.7]),
                   "uniform": pool(["a", "c"], [0.9, 0.8])})
    assert cmp["final"]["same_picks"] and cmp["final"]["heldout_delta"]["mean_pp"] == 0
    assert cmp["mwa"]["same_picks"] and not cmp["mwa"]["same_order"]
    assert not cmp["uniform"]["same_picks"] and cmp["uniform"]["heldout_delta"]["mean_pp"] == pytest.approx(10.0)


def test_bad_override_is_named(tmp_path):
    from engine.core.errors import ConfigError

    from bench.bench_mwa_donors import world_spec

    with pytest.raises(ConfigError, match="pools"):
        load_config(["pools=[best]"])
    with pytest.raises(ConfigError, match="world.json"):
        world_spec(load_config([f"world_dir={tmp_path}"]))
