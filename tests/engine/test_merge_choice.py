"""Choosing the merge (engine/merge_choice.py, issue 23): candidates scored on the run's sample, the best kept, a
fresh LoRA when none is worth it.

Pools are built around one donor `good` trained on the task by `engine.finetune`, so which candidate must win is
known by construction: two noisy copies of it (B + N and B - N) average back to `good` exactly, so a top-2 merge
beats either copy; `good` beside its anti-donor (its A negated, ΔW reversed) averages to almost nothing, so `good`
alone wins; donors of random noise remove almost nothing of the base's loss, so the arm starts from a fresh LoRA.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.engine.run_world import write_manifest

SAMPLES = 16  # the whole train file: its token-mean loss does not depend on the sampled order
MIN_GAIN = 0.02  # 30 steps on the tiny random base remove about 5% of its loss; noise removes none


@pytest.fixture(scope="module")
def chooser(tmp_path_factory, base_dir):
    from bench.world.tiny import write_task
    from engine.finetune import finetune
    from engine.finetune.config import FinetuneConfig

    root = tmp_path_factory.mktemp("choose")
    train = write_task(root / "train.jsonl", SAMPLES, seed=1, op="reverse")
    val = write_task(root / "val.jsonl", 8, seed=3, op="reverse", choices=3)
    finetune(FinetuneConfig(base=str(base_dir), data=str(train), out=str(root / "trained"), steps=30, lr=1e-2,
                            batch_size=4, progress=False, lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}))
    return {"root": root, "base": base_dir, "train": train, "val": val, "good": root / "trained" / "adapter"}


def variant(good: Path, out: Path, edit) -> Path:
    """A copy of `good` whose tensors `edit(key, tensor, generator)` rewrites (a real PEFT folder)."""
    shutil.copytree(good, out, ignore=shutil.ignore_patterns("*.json", "*.safetensors"))
    shutil.copy(good / "adapter_config.json", out / "adapter_config.json")
    gen = torch.Generator().manual_seed(sum(map(ord, out.name)))
    tensors = {k: edit(k, v.clone(), gen) for k, v in load_file(good / "adapter_model.safetensors").items()}
    save_file(tensors, out / "adapter_model.safetensors")
    return out


def noise_like(t: torch.Tensor, gen, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(t.shape, generator=gen) * t.std() * scale


def pool(chooser, name: str) -> Path:
    """One of the pools described at the top, as a manifest."""
    folder, good = chooser["root"] / f"pool-{name}", chooser["good"]
    if not folder.exists():
        folder.mkdir()
        if name == "merge-better":
            noise = {}

            def plus(k, t, g):
                noise[k] = noise_like(t, g, 1.5)
                return t + noise[k] if "lora_B" in k else t

            variant(good, folder / "noisy-plus", plus)
            variant(good, folder / "noisy-minus", lambda k, t, g: t - noise[k] if "lora_B" in k else t)
        elif name == "merge-worse":
            shutil.copytree(good, folder / "good")
            variant(good, folder / "anti", lambda k, t, g: -t if "lora_A" in k else t)
        else:  # no relative: B of pure noise, far smaller than what training learned
            for i in range(2):
                variant(good, folder / f"noise{i}", lambda k, t, g: noise_like(t, g, 0.02) if "lora_B" in k else t)
        write_manifest(folder, sorted(p.name for p in folder.iterdir() if p.is_dir()))
    return folder / "manifest.jsonl"


def config(chooser, out: Path, manifest: Path, **choose) -> dict:
    return {
        "out": str(out), "base": str(chooser["base"]), "donors": [str(manifest)], "train": str(chooser["train"]),
        "val": str(chooser["val"]), "score": {"samples": SAMPLES, "executor": "local", "backend_options": {"dtype": "float32"}},
        "select": {"k": 2},
        "finetune": {"steps": 2, "batch_size": 4, "eval_every": 1, "lr": 1e-3, "progress": False,
                     "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}},
        "arms": [{"name": "choose", "choose": {"ks": [1, 2], "min_gain": MIN_GAIN, **choose}}, {"name": "scratch", "init": "none"}],
        "sweep": {"lrs": [1e-3], "seeds": [0]},
    }


def prepared(chooser, tmp_path, name: str, **choose) -> tuple[dict, "RunConfig"]:
    from engine.run import RunConfig, prepare

    cfg = RunConfig.model_validate(config(chooser, tmp_path / name, pool(chooser, name), **choose))
    prepare(cfg)
    return json.loads((cfg.arm_dir(cfg.arms[0]) / "choice.json").read_text()), cfg


def losses(choice: dict) -> dict[str, float]:
    return {c["name"]: c["loss"] for c in choice["candidates"]}


def test_a_merge_better_than_its_donors_is_chosen(chooser, tmp_path):
    choice, cfg = prepared(chooser, tmp_path, "merge-better")
    got = losses(choice)
    assert set(got) == {"top1", "top2-linear-uniform", "top2-linear-mwa", "top2-cat-uniform", "top2-cat-mwa"}
    assert got["top2-linear-uniform"] < got["top1"] - 0.01, "premise: the noise cancels in the mean of the B's"
    assert choice["chosen"] == min(got, key=lambda n: (got[n], n)) and choice["chosen"] != "top1"
    assert choice["init"] == str(cfg.arm_dir(cfg.arms[0]) / "candidates" / "adapters" / choice["chosen"])
    ft = cfg.finetune_config(cfg.arms[0], 1e-3, 0)
    assert ft.init == choice["init"], "the arm finetunes from the chosen candidate"
    picked = json.loads((cfg.arm_dir(cfg.arms[0]) / "selection.json").read_text())
    assert sorted(d["donor"] for d in picked["donors"]) == ["noisy-minus", "noisy-plus"]


def test_the_best_donor_alone_is_chosen_when_the_merge_is_worse(chooser, tmp_path):
    choice, cfg = prepared(chooser, tmp_path, "merge-worse")
    got = losses(choice)
    assert (choice["base_loss"] - got["top1"]) / choice["base_loss"] > MIN_GAIN, "premise: good is worth starting from"
    assert got["top2-linear-uniform"] > got["top1"] + 0.1, "premise: the top-2 linear merge is worse than its best donor"
    assert choice["chosen"] == "top1"
    picked = json.loads((cfg.arm_dir(cfg.arms[0]) / "selection.json").read_text())
    assert [d["donor"] for d in picked["donors"]] == ["good"]


def test_recorded_losses_equal_scoring_the_written_merges_as_donors(chooser, tmp_path):
    """Each candidate's row against two independent computations: the written adapter scored as an ordinary donor
    by `mashup score`, and a plain PEFT forward over the same rows."""
    from engine.core.data import encode_sample, load_jsonl
    from engine.scoring import score
    from engine.scoring.api import ScoreConfig
    from engine.selection import select
    from tests.adapters import peft_reference_examples, peft_reference_loss
    from transformers import AutoTokenizer

    choice, cfg = prepared(chooser, tmp_path, "merge-better")
    adapters = cfg.arm_dir(cfg.arms[0]) / "candidates" / "adapters"
    summary = score(ScoreConfig(base=str(chooser["base"]), donors=[str(adapters)], data=chooser["train"],
                                out=tmp_path / "plain", samples=SAMPLES, executor="local",
                                backend_options={"dtype": "float32"}))
    plain = {d.donor: d.loss for d in select(tmp_path / "plain", pool=summary.pool, strategy="all").donors}
    assert set(plain) == set(losses(choice))
    for name, loss in losses(choice).items():
        assert loss == pytest.approx(plain[name], abs=1e-6), name
    sample = encode_sample(AutoTokenizer.from_pretrained(str(chooser["base"])), load_jsonl(chooser["train"]))
    for name in ("top2-linear-uniform", "top2-cat-mwa"):
        assert losses(choice)[name] == pytest.approx(peft_reference_loss(chooser["base"], adapters / name, sample)[0],
                                                     abs=1e-5), name
    # the gain in paired SEs, from per-example reference forwards: d_i = base NLL_i - candidate NLL_i over t_i tokens,
    # D = sum d / sum t, SE = sqrt(n / (n - 1) * sum (d_i - D t_i)^2) / sum t
    base = peft_reference_examples(chooser["base"], None, sample)
    for name in ("top1", "top2-linear-uniform"):
        cand = peft_reference_examples(chooser["base"], adapters / name, sample)
        d = [b[0] - c[0] for b, c in zip(base, cand)]
        t = [c[2] for c in cand]
        gap = sum(d) / sum(t)
        se = math.sqrt(len(d) / (len(d) - 1) * sum((di - gap * ti) ** 2 for di, ti in zip(d, t))) / sum(t)
        recorded = next(c["z"] for c in choice["candidates"] if c["name"] == name)
        assert recorded == pytest.approx(gap / se, rel=1e-4), name


def test_no_candidate_worth_it_starts_from_a_fresh_lora_and_trains_like_scratch(chooser, tmp_path):
    from engine.run import RunConfig, run

    cfg = RunConfig.model_validate(config(chooser, tmp_path / "none", pool(chooser, "none")))
    report = run(cfg).read_text()
    choice = json.loads((cfg.arm_dir(cfg.arms[0]) / "choice.json").read_text())
    assert choice["chosen"] == "none" and choice["init"] is None
    best = min(c["loss"] for c in choice["candidates"])
    assert (choice["base_loss"] - best) / choice["base_loss"] < MIN_GAIN, "premise: noise removes little of the base's loss"
    assert not (cfg.arm_dir(cfg.arms[0]) / "selection.json").exists()
    logs = [(cfg.run_dir(a, 1e-3, 0) / "log.jsonl").read_text().splitlines() for a in cfg.arms]
    strip = [[{k: v for k, v in json.loads(line).items() if "time" not in k and "second" not in k} for line in log]
             for log in logs]
    assert strip[0] == strip[1], "a fresh-LoRA choice trains exactly like scratch at the same seed and LR"
    assert "Merge chosen for `choose`: none" in report and "none (fresh LoRA)" in report
    results = json.loads((cfg.out / "results.json").read_text())
    assert results["choices"]["choose"]["chosen"] == "none"
    row = next(r for r in results["rows"] if r["arm"] == "choose")
    assert row["role"] == "no donors"
    timings = json.loads((cfg.out / "timings.json").read_text())
    assert timings["select+merge:choose"] > 0, "the choice's seconds count against the arm, even choosing a fresh LoRA"
    assert row["overhead_seconds"] == pytest.approx(timings["score"] + timings["select+merge:choose"])


def test_allow_none_false_keeps_the_best_candidate_and_a_rerun_recomputes_nothing(chooser, tmp_path):
    choice, cfg = prepared(chooser, tmp_path, "none", allow_none=False)
    assert choice["chosen"] != "none" and choice["init"] is not None
    from engine.run import prepare

    first = (cfg.arm_dir(cfg.arms[0]) / "choice.json").read_text()
    prepare(cfg)
    again = json.loads((cfg.arm_dir(cfg.arms[0]) / "choice.json").read_text())
    assert again["scored_now"] == 0 and again["merged_now"] == 0
    assert {k: v for k, v in again.items() if k not in ("scored_now", "merged_now")} == \
        {k: v for k, v in json.loads(first).items() if k not in ("scored_now", "merged_now")}


def test_choose_refuses_overrides_it_would_ignore():
    from engine.run_config import ArmSpec

    with pytest.raises(ValueError, match="choose: needs init: merge"):
        ArmSpec.model_validate({"name": "a", "init": "none", "choose": {}})
    with pytest.raises(ValueError, match="select.k"):
        ArmSpec.model_validate({"name": "a", "choose": {}, "select": {"k": 3}})
    with pytest.raises(ValueError, match="merge.method"):
        ArmSpec.model_validate({"name": "a", "choose": {}, "merge": {"method": "ties"}})


def test_a_donor_changed_in_place_remerges_and_rescores_its_candidates_like_a_fresh_folder(chooser, tmp_path):
    """Same donor ids, new content: every candidate built on it is merged and scored again, and the choice equals
    what a fresh folder makes of the new pool."""
    from engine.run import RunConfig, prepare

    pool_dir = tmp_path / "pool"
    shutil.copytree(pool(chooser, "merge-better").parent, pool_dir)
    manifest = pool_dir / "manifest.jsonl"
    cfg = RunConfig.model_validate(config(chooser, tmp_path / "run", manifest))
    prepare(cfg)
    before = json.loads((cfg.arm_dir(cfg.arms[0]) / "choice.json").read_text())
    shutil.copy(pool_dir / "noisy-plus" / "adapter_model.safetensors", pool_dir / "noisy-minus" / "adapter_model.safetensors")
    prepare(cfg)
    again = json.loads((cfg.arm_dir(cfg.arms[0]) / "choice.json").read_text())
    assert again["merged_now"] == len(again["candidates"]) and again["scored_now"] == len(again["candidates"])
    assert losses(again) != losses(before)
    fresh_cfg = RunConfig.model_validate(config(chooser, tmp_path / "fresh", manifest))
    prepare(fresh_cfg)
    fresh = json.loads((fresh_cfg.arm_dir(fresh_cfg.arms[0]) / "choice.json").read_text())
    assert again["chosen"] == fresh["chosen"]
    assert losses(again) == pytest.approx(losses(fresh), abs=1e-9)


@pytest.mark.parametrize("gain, z, settings, want", [
    (0.30, 5.0, {}, "top2"),                       # large and sure: kept
    (0.30, 1.2, {}, "none"),                       # large but within noise on this sample: a fresh LoRA
    (0.30, 1.2, {"min_z": 0}, "top2"),             # the paired check off
    (0.30, None, {}, "top2"),                      # rows without per-example losses: only min_gain speaks
    (0.10, 9.0, {}, "none"),                       # sure but small: under min_gain
    (0.30, 1.2, {"allow_none": False}, "top2"),    # never a fresh LoRA
])
def test_the_none_call_needs_both_a_share_of_the_base_loss_and_paired_ses(gain, z, settings, want):
    from engine.merge_choice import decide
    from engine.run_config import ChooseSettings

    ranked = [{"name": "top2", "gain": gain, "z": z}, {"name": "top1", "gain": gain / 2, "z": z}]
    chosen, why = decide(ranked, ChooseSettings(**settings))
    assert chosen == want, why
    if want == "none":
        assert ("min_z" in why) == (gain >= 0.2), why
