"""`mashup run` end to end on the tiny world: every stage, the report with its plots, and resume."""
import json

import pandas as pd
import pytest
import yaml

from engine.cli import main


@pytest.fixture(scope="module")
def run_config(tmp_path_factory, base_dir, pool_dir, task_file):
    out = tmp_path_factory.mktemp("run")
    cfg = {
        "out": str(out / "run"), "base": str(base_dir), "donors": [str(pool_dir / "qv")],
        "train": str(task_file), "val": str(task_file), "eval": str(task_file),
        "score": {"samples": 8, "actors": 1, "donors_per_call": 4},
        "select": {"k": 2},
        "finetune": {"steps": 4, "batch_size": 4, "eval_every": 2, "lr": 1e-3, "progress": False,
                     "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}},
        "sweep": {"lrs": [1e-3, 3e-3], "seeds": [0]},
    }
    path = out / "run.yaml"
    path.write_text("# mashup run --config run.yaml\n" + yaml.safe_dump(cfg))
    return path, out / "run"


@pytest.fixture(scope="module")
def finished(ray_local, run_config):
    path, out = run_config
    assert main(["run", "--config", str(path)]) == 0
    return out


def test_report_has_every_part(finished):
    report = (finished / "report.md").read_text()
    for part in ("## Verdict", "## Results", "| mashup |", "| scratch |", "## Wall-clock per stage", "score",
                 "plots/val_accuracy.png", "Selected for `mashup`"):
        assert part in report, part
    assert (finished / "plots" / "val_accuracy.png").stat().st_size > 1000
    assert (finished / "plots" / "val_loss.png").stat().st_size > 1000
    results = json.loads((finished / "results.json").read_text())
    assert {r["arm"] for r in results["rows"]} == {"mashup", "scratch"}
    assert all(r["lr"] in (1e-3, 3e-3) for r in results["rows"])
    assert "| rank / alpha | trainable params |" in report and "rank by token accuracy" in report
    assert "Selected for `mashup` (top-k by loss" in report


def test_report_gives_each_arms_rank_alpha_and_trainable_parameters(finished, base_dir):
    """Counted independently: PEFT's own trainable parameters for scratch's fresh LoRA and for the merged init."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    rows = {r["arm"]: r for r in json.loads((finished / "results.json").read_text())["rows"]}
    scratch = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base_dir)),
                             LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_dir)),
                                       str(finished / "arms" / "mashup" / "merged"), is_trainable=True)

    def trainable(model):
        return sum(p.numel() for p in model.parameters() if p.requires_grad)

    assert (rows["scratch"]["rank"], rows["scratch"]["alpha"]) == (4, 8)
    assert rows["scratch"]["trainable_params"] == trainable(scratch)
    assert (rows["mashup"]["rank"], rows["mashup"]["alpha"]) == (8, 16)  # the qv donors' r and alpha
    assert rows["mashup"]["trainable_params"] == trainable(merged) == 2 * trainable(scratch)


def test_random_k_draws_per_seed_and_match_scratch_rank_refactors(ray_local, run_config, tmp_path):
    """Two seeds, two draws (each its own selection and merge, each run starting from its own); with
    match_scratch_rank every merge is re-factored to finetune.lora's r and alpha."""
    from engine.run import RunConfig, prepare

    path, _ = run_config
    data = yaml.safe_load(path.read_text())
    data.update(out=str(tmp_path / "run"), sweep={"seeds": [0, 1]}, match_scratch_rank=True,
                arms=[{"name": "random-1", "select": {"strategy": "random-k", "k": 1}}, {"name": "top", "select": {"k": 1}}],
                baseline="top")
    cfg = RunConfig.model_validate(data)
    prepare(cfg)
    random_arm, top_arm = cfg.arms
    draws = [json.loads((cfg.arm_dir(random_arm) / f"draw-seed{s}" / "selection.json").read_text()) for s in (0, 1)]
    assert [d["donors"][0]["donor"] for d in draws] == ["donor3", "donor1"]  # random.Random(0|1).sample of 3 names
    assert {cfg.finetune_config(random_arm, None, s).init for s in (0, 1)} == {
        str(cfg.arm_dir(random_arm) / f"draw-seed{s}" / "merged") for s in (0, 1)}
    assert cfg.finetune_config(top_arm, None, 1).init == str(cfg.arm_dir(top_arm) / "merged")
    for merged in [cfg.arm_dir(random_arm) / "draw-seed0" / "merged", cfg.arm_dir(top_arm) / "merged"]:
        adapter = json.loads((merged / "adapter_config.json").read_text())
        assert (adapter["r"], adapter["lora_alpha"]) == (4, 8), merged


def test_merged_init_starts_at_its_scored_loss(finished, base_dir, tokenizer, task_file):
    """Stage hand-off: step-0 eval of the mashup arm == the scoring engine's loss of the merged adapter."""
    from actors.backends.base import DonorRequest
    from actors.backends.hf import HFBackend, HFOptions
    from engine.core.data import encode_sample, load_jsonl

    sample = encode_sample(tokenizer, load_jsonl(task_file))
    [scored] = HFBackend(str(base_dir), HFOptions()).score(
        [DonorRequest("merged", str(finished / "arms" / "mashup" / "merged"), 1)], sample)
    log = pd.read_parquet(finished / "arms" / "mashup" / "runs" / "lr0.001_seed0" / "log.parquet")
    step0 = log[(log.event == "eval") & (log.step == 0)].loss.iloc[0]
    assert abs(step0 - scored.loss) < 1e-5
    base_log = pd.read_parquet(finished / "arms" / "scratch" / "runs" / "lr0.001_seed0" / "log.parquet")
    [base] = HFBackend(str(base_dir), HFOptions()).score([DonorRequest("__base__", "", 0)], sample)
    assert abs(base_log[(base_log.event == "eval") & (base_log.step == 0)].loss.iloc[0] - base.loss) < 1e-5


def test_rerun_resumes_without_retraining(finished, run_config):
    """A rerun with everything cached trains nothing, merges nothing, and leaves the recorded time alone: the
    wall-clock figures are those of the work behind the results (they grew with every rerun before)."""
    path, out = run_config
    logs = sorted(out.glob("arms/*/runs/*/log.parquet"))
    before = {p: p.stat().st_mtime_ns for p in logs}
    merged = (out / "arms" / "mashup" / "merged" / "merge_info.json").stat().st_mtime_ns

    def recorded():
        rows = json.loads((out / "results.json").read_text())["rows"]
        return ((out / "timings.json").read_text(), [(r["seconds_to_parity"], r["overhead_seconds"]) for r in rows],
                (out / "report.md").read_text().split("## Verdict")[1])

    timings, wall_clock, report = recorded()
    assert {"score", "select+merge:mashup", "finetune:scratch/lr0.001_seed0"} <= set(json.loads(timings))
    assert main(["run", "--config", str(path)]) == 0
    assert {p: p.stat().st_mtime_ns for p in logs} == before
    assert (out / "arms" / "mashup" / "merged" / "merge_info.json").stat().st_mtime_ns == merged
    assert recorded() == (timings, wall_clock, report)


def test_timings_record_the_work_behind_the_current_results(tmp_path):
    """Redone: replaced. Resumed on the same sample: added. Another sample: replaced. A stage the run no longer
    has: dropped. Read back from disk each time, as a resumed run does."""
    from engine.run import Timings

    path = tmp_path / "timings.json"
    Timings(path).add("score", 2.0, "sample-a")
    Timings(path).add("score", 1.5, "sample-a")  # the part resumed after a kill: honest cost of the same scores
    Timings(path).set("finetune:a/seed0", 4.0)
    Timings(path).set("finetune:a/seed0", 3.0)  # retrained: the old run's time is not behind the results any more
    assert json.loads(path.read_text()) == {"score": 3.5, "finetune:a/seed0": 3.0}
    Timings(path).add("score", 1.0, "sample-b")  # a new sample: the old sample's scoring is not what selection reads
    Timings(path).keep({"score"})
    assert json.loads(path.read_text()) == {"score": 1.0}
    Timings(path).use("score", "sample-a")  # back to a sample scored before, all cached: what it cost then
    assert json.loads(path.read_text()) == {"score": 3.5}


def test_bad_section_is_named_before_any_work(tmp_path, run_config, capsys):
    path, _ = run_config
    cfg = yaml.safe_load(path.read_text())
    cfg["finetune"]["stepz"] = 3
    cfg["out"] = str(tmp_path / "never")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    assert main(["run", "--config", str(bad)]) == 2
    assert "finetune.stepz: unknown key" in capsys.readouterr().err  # caught when the config loads
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("strategy, arm, message", [
    ("cascade", {"name": "rand", "select": {"strategy": "random-k"}}, "arms.rand: strategy 'random-k' needs every donor"),
    ("cascade", {"name": "wide", "select": {"k": 5}},
     r"arms.wide: select.k \(5\) exceeds score.cascade.min_survivors \(4\)"),
    ("screen", {"name": "worst", "select": {"strategy": "worst-k"}}, "arms.worst: strategy 'worst-k' needs every donor"),
    ("screen", {"name": "every", "select": {"strategy": "all"}}, "arms.every: strategy 'all' needs every donor"),
])
def test_cascade_and_screen_conflicts_are_named_before_scoring(tmp_path, run_config, capsys, strategy, arm, message):
    import re

    path, _ = run_config
    cfg = yaml.safe_load(path.read_text())
    cfg["score"]["strategy"] = strategy
    cfg["arms"] = [arm, {"name": "scratch", "init": "none"}]
    cfg["out"] = str(tmp_path / "never")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(cfg))
    assert main(["run", "--config", str(bad)]) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "never").exists()


def test_a_runs_cascade_settles_on_the_largest_k_its_arms_merge(run_config, tmp_path):
    """Unset, cascade.settle_k is the arms' largest k (a choose arm: its largest candidate k); set, it is kept."""
    from engine.run import RunConfig

    path, _ = run_config
    data = yaml.safe_load(path.read_text())
    data.update(out=str(tmp_path / "run"), score={**data["score"], "strategy": "cascade"},
                arms=[{"name": "two", "select": {"k": 2}}, {"name": "pick", "choose": {"ks": [1, 3]}},
                      {"name": "scratch", "init": "none"}], baseline="scratch")
    assert RunConfig.model_validate(data).score_config().cascade.settle_k == 3
    data["score"]["cascade"] = {"settle_k": 1}
    assert RunConfig.model_validate(data).score_config().cascade.settle_k == 1
    data["score"] = {**data["score"], "strategy": "exhaustive"}
    data["score"].pop("cascade")
    assert RunConfig.model_validate(data).score_config().cascade.settle_k is None
