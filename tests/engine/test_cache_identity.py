"""Nothing cached is reused unless what produced it is unchanged, by content (docs/contracts.md, "Cached results")."""
import json
import shutil

import pytest
import torch
import yaml

from engine.cli import main
from engine.core.errors import DonorError, MashupError
from engine.scoring import ScoreConfig, score
from engine.scoring.store import read_scores


def _score(out, donors, data, base, **kw):
    cfg = ScoreConfig(base=str(base), donors=[str(d) for d in donors], data=data, out=out, samples=8, **kw)
    return score(cfg), read_scores(out).set_index("donor")


def test_donor_changed_in_place_is_rescored(ray_local, tmp_path, pool_dir, task_file, base_dir):
    pool = shutil.copytree(pool_dir / "qv", tmp_path / "pool")
    s1, before = _score(tmp_path / "out", [pool], task_file, base_dir)
    shutil.copy(pool / "donor3" / "adapter_model.safetensors", pool / "donor1" / "adapter_model.safetensors")
    s2, after = _score(tmp_path / "out", [pool], task_file, base_dir)
    assert (s2.scored, s2.skipped_done) == (1, 2)  # donor1 only; the base and the others are reused
    assert after.loc["donor1", "loss"] == pytest.approx(before.loc["donor3", "loss"], abs=1e-6)
    assert after.loc["donor1", "donor_sha256"] != before.loc["donor1", "donor_sha256"]
    assert after.loc["donor1", "base_fingerprint"] == before.loc["donor1", "base_fingerprint"]


def test_manifest_id_pointed_at_another_folder_is_rescored(ray_local, tmp_path, pool_dir, task_file, base_dir):
    shutil.copytree(pool_dir / "qv", tmp_path / "m" / "qv")
    manifest = tmp_path / "m" / "donors.jsonl"
    manifest.write_text(json.dumps({"id": "pick", "path": "qv/donor1"}) + "\n")
    _, first = _score(tmp_path / "out", [manifest], task_file, base_dir)
    manifest.write_text(json.dumps({"id": "pick", "path": "qv/donor5"}) + "\n")
    s2, second = _score(tmp_path / "out", [manifest], task_file, base_dir)
    assert s2.scored == 1 and second.loc["pick", "path"].endswith("donor5")
    assert second.loc["pick", "loss"] != first.loc["pick", "loss"]


def test_base_changed_in_place_invalidates_every_score(ray_local, tmp_path, pool_dir, task_file, base_dir):
    from safetensors.torch import load_file, save_file

    base = shutil.copytree(base_dir, tmp_path / "base")
    _, before = _score(tmp_path / "out", [pool_dir / "qv"], task_file, base)
    weights = base / "model.safetensors"
    tensors = load_file(str(weights))
    key = next(k for k in tensors if "mlp.down_proj" in k)
    tensors[key] = tensors[key] + 0.05 * torch.randn(tensors[key].shape, generator=torch.Generator().manual_seed(0))
    save_file(tensors, str(weights), metadata={"format": "pt"})
    s2, after = _score(tmp_path / "out", [pool_dir / "qv"], task_file, base)
    assert s2.skipped_done == 0 and s2.scored == 4  # every donor and the base, none reused
    rows = read_scores(tmp_path / "out")
    assert rows.groupby("sample_id").size().tolist() == [4, 4]  # old rows kept, under the old base's sample id
    base_rows = rows[rows.donor == "__base__"]
    assert base_rows.base_fingerprint.nunique() == 2 and base_rows.loss.nunique() == 2


def test_a_base_the_backend_cannot_run_stops_before_any_donor(ray_local, tmp_path, pool_dir, task_file, base_dir):
    """A real failure of the backend on the base (its weights on the meta device give no numbers): one line that
    names the backend and the base, and no donor is scored."""
    with pytest.raises(MashupError, match=r"the hf backend cannot score the base model .*No donor was scored"):
        _score(tmp_path / "out", [pool_dir / "qv"], task_file, base_dir, backend_options={"device": "meta"})
    rows = read_scores(tmp_path / "out")
    assert set(rows.donor) <= {"__base__"}


def test_merge_refuses_a_donor_changed_since_it_was_scored(ray_local, tmp_path, pool_dir, task_file, base_dir):
    pool = shutil.copytree(pool_dir / "qv", tmp_path / "pool")
    _score(tmp_path / "out", [pool], task_file, base_dir)
    assert main(["select", "--scores", str(tmp_path / "out"), "--k", "2", "--out", str(tmp_path / "sel.json")]) == 0
    picked = json.loads((tmp_path / "sel.json").read_text())["donors"]
    assert all(len(d["fingerprint"]) == 64 for d in picked)
    victim = pool / picked[0]["donor"]
    other = next(p for p in pool.iterdir() if p.name not in {d["donor"] for d in picked})
    shutil.copy(other / "adapter_model.safetensors", victim / "adapter_model.safetensors")
    from engine.merge import MergeConfig
    from engine.merge.streaming import merge_with_config

    with pytest.raises(DonorError, match="changed since it was scored"):
        merge_with_config(MergeConfig(selection=tmp_path / "sel.json", out=tmp_path / "merged"))
    assert not (tmp_path / "merged").exists()


@pytest.fixture(scope="module")
def run_config(tmp_path_factory, base_dir, pool_dir, task_file):
    out = tmp_path_factory.mktemp("identity")
    cfg = {
        "out": str(out / "run"), "base": str(base_dir), "donors": [str(pool_dir / "qv")],
        "train": str(task_file), "val": str(task_file),
        "score": {"samples": 8, "actors": 1, "donors_per_call": 4},
        "select": {"k": 2}, "merge": {"method": "svd", "svd_rank": 8},
        "finetune": {"steps": 2, "batch_size": 4, "eval_every": 2, "lr": 1e-3, "progress": False,
                     "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}},
    }
    return cfg, out


def _run(cfg, out, name):
    path = out / f"{name}.yaml"
    path.write_text(f"# mashup run --config {name}.yaml\n" + yaml.safe_dump(cfg))
    assert main(["run", "--config", str(path)]) == 0
    run = out / "run"
    return {p.relative_to(run).as_posix(): p.stat().st_mtime_ns
            for p in [*run.glob("arms/*/runs/*/log.parquet"), *run.glob("arms/*/merged/merge_info.json")]}


def test_a_changed_merge_option_remerges_and_retrains(ray_local, run_config):
    cfg, out = run_config
    first = _run(cfg, out, "a")
    again = _run(cfg, out, "a")
    assert again == first  # nothing changed: nothing redone
    cfg = {**cfg, "merge": {"method": "svd", "svd_rank": 4}}
    changed = _run(cfg, out, "b")
    merged, mashup_run, scratch_run = ("arms/mashup/merged/merge_info.json", "arms/mashup/runs/seed0/log.parquet",
                                       "arms/scratch/runs/seed0/log.parquet")
    assert changed[merged] != first[merged] and changed[mashup_run] != first[mashup_run]
    assert changed[scratch_run] == first[scratch_run]  # its init did not change
    info = json.loads((out / "run" / merged).read_text())
    assert info["r"] == 4
    ft_info = json.loads((out / "run" / "arms/mashup/runs/seed0/adapter/finetune_info.json").read_text())
    from engine.core.adapter import fingerprint

    assert ft_info["init_fingerprint"] == fingerprint(out / "run" / "arms/mashup/merged")


def test_held_out_evaluation_is_redone_when_its_eval_file_changes(tmp_path, base_dir, pool_dir, task_file):
    from types import SimpleNamespace

    from engine.report import _final_eval

    run_dir = tmp_path / "run"
    shutil.copytree(pool_dir / "qv" / "donor1", run_dir / "adapter")
    eval_file = tmp_path / "eval.jsonl"
    lines = task_file.read_text().splitlines()
    eval_file.write_text("\n".join(lines[:6]) + "\n")
    cfg = SimpleNamespace(base=str(base_dir), eval=eval_file, chat_template=False)
    cache = run_dir / "final_eval.json"

    def written() -> tuple[int, int]:  # the cache is replaced atomically: a rewrite is a new inode and mtime
        stat = cache.stat()
        return stat.st_ino, stat.st_mtime_ns

    first = _final_eval(cfg, run_dir)
    stored = written()
    assert _final_eval(cfg, run_dir) == first
    assert written() == stored  # reused: the evaluation was not redone and rewritten
    eval_file.write_text("\n".join(lines[6:12]) + "\n")
    assert _final_eval(cfg, run_dir) != first
    assert written() != stored
