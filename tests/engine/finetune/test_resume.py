"""A killed finetune goes on from its last saved state and ends exactly where an uninterrupted run ends.

Every run here is a real process (tests/engine/finetune/resume_runner.py), killed by a real signal at a known step
between two saves; the reference is the same config run through without a kill, in the same kind of process.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from safetensors.torch import load_file

from engine.finetune.outputs import read_log
from engine.finetune.resume import STATE_DIR, load_state, matching_state

RUNNER = Path(__file__).with_name("resume_runner.py")
REPO = Path(__file__).resolve().parents[3]


def run(cfg, *kill: str) -> int:
    path = Path(cfg.out).parent / (Path(cfg.out).name + ".json")
    path.write_text(cfg.model_dump_json())
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(RUNNER), str(path), *kill], env=env, cwd=REPO).returncode


def rows(out: Path, event: str) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in read_log(out) if r["event"] == event]


@pytest.fixture(scope="module")
def config(make_config, merged_init):
    """8 steps from a merged init with LoRA dropout (so the RNG state matters), a state every 2 steps."""
    fields = dict(steps=8, save_every=2, eval_every=2, init=str(merged_init), lora={"dropout": 0.1})
    return lambda out, **over: make_config(out, **{**fields, **over})


@pytest.fixture(scope="module")
def reference(config, tmp_path_factory) -> Path:
    cfg = config(tmp_path_factory.mktemp("resume") / "uninterrupted")
    assert run(cfg) == 0
    return Path(cfg.out)


def assert_same_run(out: Path, ref: Path) -> None:
    assert rows(out, "train") == rows(ref, "train")  # every step's loss, lr, grad norm: bit for bit
    assert rows(out, "eval") == rows(ref, "eval")
    got, want = load_file(str(out / "adapter" / "adapter_model.safetensors")), \
        load_file(str(ref / "adapter" / "adapter_model.safetensors"))
    assert got.keys() == want.keys() and all((got[k] == want[k]).all() for k in got)
    assert not (out / STATE_DIR).exists()  # a finished run keeps no state


def test_a_run_killed_between_two_saves_resumes_to_the_uninterrupted_losses(config, reference, tmp_path):
    cfg = config(tmp_path / "killed")
    assert run(cfg, "5", "KILL") == -9  # SIGKILL after step 5: the last state is step 4's
    assert load_state(Path(cfg.out), cfg.identity()).step == 4
    assert run(cfg) == 0
    assert_same_run(Path(cfg.out), reference)
    log = read_log(Path(cfg.out))
    (resumed,) = [r for r in log if r["event"] == "resume"]
    assert resumed["step"] == 4 and resumed["lost_steps"] == 1
    # honest time: the resumed clock starts where the killed run's last row left it, lost step included
    seconds = [r["seconds"] for r in log]
    assert seconds == sorted(seconds)
    steps = sorted({c.name for c in (Path(cfg.out) / "checkpoints").iterdir()})
    assert steps == [f"step-{s:06d}" for s in (2, 4, 6, 8)]
    # and the run's report says so
    from engine.report import resumed_runs

    run_cfg = SimpleNamespace(arms=[SimpleNamespace(name="mashup")], lrs=lambda: [None], sweep=SimpleNamespace(seeds=[0]),
                              run_dir=lambda arm, lr, seed: Path(cfg.out))
    assert resumed_runs(run_cfg) == [{"run": "mashup/seed0", "from_step": 4, "lost_steps": 1}]


def test_a_clean_stop_saves_its_state_at_the_step_it_stopped(config, reference, tmp_path):
    cfg = config(tmp_path / "stopped")
    assert run(cfg, "3", "TERM") == 143  # SIGTERM during step 3: the state is saved at step 3, not 2
    assert load_state(Path(cfg.out), cfg.identity()).step == 3
    assert run(cfg) == 0
    assert_same_run(Path(cfg.out), reference)


def test_a_state_of_another_config_init_or_data_is_refused_by_content(config, make_config, task_file, eval_file,
                                                                       tmp_path):
    cfg = config(tmp_path / "other")
    assert run(cfg, "3", "KILL") == -9
    out = Path(cfg.out)
    assert matching_state(out, cfg.identity())
    assert not matching_state(out, config(out, lr=1e-2).identity())
    assert not matching_state(out, config(out, init=None).identity())
    assert not matching_state(out, config(out, data=str(eval_file)).identity())
    # the finetune CLI refuses the folder rather than mixing runs; `overwrite` starts again from step 0
    from engine.core.errors import ConfigError
    from engine.finetune.preflight import claim_out_dir

    with pytest.raises(ConfigError, match="already holds a finetune run"):
        claim_out_dir(config(out, lr=1e-2))
    other = config(out, lr=1e-2, overwrite=True)
    assert run(other) == 0
    assert not [r for r in read_log(out) if r["event"] == "resume"]
    assert [r["step"] for r in read_log(out) if r["event"] == "train"] == list(range(1, 9))


def test_a_state_is_discarded_when_the_identity_moved(config, tmp_path):
    cfg = config(tmp_path / "moved")
    assert run(cfg, "3", "KILL") == -9
    assert load_state(Path(cfg.out), config(Path(cfg.out), lr=1e-2).identity()) is None
    assert not (Path(cfg.out) / STATE_DIR).exists()


def test_mashup_run_resumes_an_unfinished_arm(tmp_path, config, reference, monkeypatch):
    """engine.run.finetune_one keeps a matching state (and wipes anything else)."""
    from engine import run as run_stage

    cfg = config(tmp_path / "arm")
    assert run(cfg, "5", "KILL") == -9

    class OneArm:
        def finetune_config(self, arm, lr, seed):
            return cfg

    calls = []  # the finetune itself is the tests above; here only what finetune_one leaves for it
    monkeypatch.setattr("engine.finetune.finetune", lambda ft: calls.append(load_state(Path(ft.out), ft.identity())))
    run_stage.finetune_one(OneArm(), SimpleNamespace(name="arm"), None, 0)
    assert calls[-1].step == 4  # the folder was kept for the resume
    (Path(cfg.out) / STATE_DIR / "state.json").write_text(json.dumps({"identity": {}}))
    run_stage.finetune_one(OneArm(), SimpleNamespace(name="arm"), None, 0)
    assert calls[-1] is None and not Path(cfg.out).exists()  # not this run's state: the folder was wiped


def test_a_deepspeed_state_is_found_only_for_its_own_run(make_config, tmp_path):
    """A DeepSpeed run's states sit in its Ray Train storage, under a name made from its identity: the same config
    finds them (and preflight keeps the folder for the resume), another config, init or data never does."""
    from engine.finetune.preflight import claim_out_dir
    from engine.finetune.resume import RAY_TRAIN_DIR, has_state, ray_train_name, read_state, write_state

    def cfg(**over):
        return make_config(tmp_path / "ds", executor="deepspeed", deepspeed={"num_workers": 2}, **over)

    mine = cfg()
    folder = tmp_path / "ds" / RAY_TRAIN_DIR / ray_train_name(mine) / "state-000002"
    for rank in (0, 1):
        write_state(folder, 2, rank, 2, {"rank": rank}, mine.identity())
    (tmp_path / "ds" / "log.jsonl").write_text("")
    assert has_state(mine) and not has_state(cfg(lr=1e-2)) and not has_state(cfg(init=None, seed=1))
    assert read_state(folder, mine.identity()).parts == [{"rank": 0}, {"rank": 1}]
    assert read_state(folder, cfg(lr=1e-2).identity()) is None  # refused by content, even if found by path
    claim_out_dir(mine.resolved())  # kept: this run resumes
    assert folder.is_dir() and (tmp_path / "ds" / "log.jsonl").exists()
    (folder / "rank-1.safetensors").unlink()
    assert read_state(folder, mine.identity()) is None  # a state missing a rank's part is not used


def test_a_shared_storage_path_keeps_each_out_folder_to_its_own_states(make_config, tmp_path):
    """Several runs may share one deepspeed.storage_path: the same config writing elsewhere never resumes another
    folder's run, and `overwrite` clears this run's states there too (it starts again from step 0)."""
    from engine.finetune.preflight import claim_out_dir
    from engine.finetune.resume import has_state, ray_train_name, write_state

    shared = tmp_path / "shared"

    def cfg(out: str, **over):
        return make_config(tmp_path / out, executor="deepspeed",
                           deepspeed={"num_workers": 2, "storage_path": str(shared)}, **over)

    mine, elsewhere = cfg("a"), cfg("b")
    assert mine.identity() == elsewhere.identity() and ray_train_name(mine) != ray_train_name(elsewhere)
    folder = shared / ray_train_name(mine) / "state-000002"
    for rank in (0, 1):
        write_state(folder, 2, rank, 2, {"rank": rank}, mine.identity())
    assert has_state(mine) and not has_state(elsewhere)
    claim_out_dir(cfg("a", overwrite=True).resolved())
    assert not (shared / ray_train_name(mine)).exists() and not has_state(mine)
