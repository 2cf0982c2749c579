"""One prompt format per `mashup run`: the run-level `chat_template` reaches scoring (the sample id hashes the token
ids), finetuning (the step-0 validation loss), the checkpoint-merge evaluation and the held-out evaluation; a stage
section that sets its own is refused when the config loads."""
from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
import yaml

from engine.cli import main

TEMPLATE = ("{% for m in messages %}<s>user: {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}assistant:{% endif %}")


@pytest.fixture(scope="module")
def chat_base(tmp_path_factory, base_dir):
    """The tiny base with a chat template in its tokenizer (the tiny world's has none)."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("chat") / "base"
    shutil.copytree(base_dir, folder)
    tok = AutoTokenizer.from_pretrained(str(folder))
    tok.chat_template = TEMPLATE
    tok.save_pretrained(str(folder))
    return folder


def write_config(folder, base, pool_dir, task_file, sections=None, **top):
    """A tiny run: 8 scored examples, 4 steps, one seed; `sections` adds keys to the stage sections."""
    cfg = {"out": str(folder / "run"), "base": str(base), "donors": [str(pool_dir / "qv")],
           "train": str(task_file), "val": str(task_file), "eval": str(task_file),
           "score": {"samples": 8, "executor": "local", "donors_per_call": 4}, "select": {"k": 2},
           "finetune": {"steps": 4, "batch_size": 4, "eval_every": 2, "lr": 1e-3, "progress": False,
                        "lora": {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}},
           "arms": [{"name": "mashup", "checkpoint_merge": {"save_every": 2}}, {"name": "scratch", "init": "none"}],
           **top}
    for section, values in (sections or {}).items():
        cfg[section].update(values)
    path = folder / "run.yaml"
    path.write_text("# mashup run --config run.yaml\n" + yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("sections", [{"score": {"chat_template": True}},
                                      {"score": {"chat_template": True}, "finetune": {"chat_template": False}},
                                      {"finetune": {"chat_template": True}}])
def test_a_stage_section_cannot_set_its_own_prompt_format(tmp_path, chat_base, pool_dir, task_file, capsys, sections):
    path = write_config(tmp_path, chat_base, pool_dir, task_file, sections=sections)
    assert main(["run", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    section = next(iter(sections))
    assert len(err.splitlines()) == 1
    assert f"{section}.chat_template: set the prompt format once for the whole run, as the top-level " \
           "`chat_template:` key" in err
    assert not (tmp_path / "run").exists()


def test_a_base_without_a_chat_template_is_named_before_any_work(tmp_path, base_dir, pool_dir, task_file, capsys):
    path = write_config(tmp_path, base_dir, pool_dir, task_file, chat_template=True)
    assert main(["run", "--config", str(path)]) == 2
    assert "chat_template: the base's tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "run" / "score").exists()


def test_the_run_level_switch_reaches_every_stage(tmp_path, chat_base, pool_dir, task_file):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.core.data import encode_sample, load_jsonl, sample_examples
    from engine.core.identity import base_fingerprint
    from engine.evaluate import evaluate
    from engine.scoring.store import read_scores

    path = write_config(tmp_path, chat_base, pool_dir, task_file, chat_template=True)
    assert main(["run", "--config", str(path)]) == 0
    out = tmp_path / "run"
    tok = AutoTokenizer.from_pretrained(str(chat_base))
    examples = load_jsonl(task_file)

    # Scoring: the sample id is the hash of the template's token ids, not of the plain ones.
    from engine.scoring.api import ScoreSettings

    salt = f"{base_fingerprint(str(chat_base))[1]}|scorer:{ScoreSettings().scorer_key()}"  # the run's default scorer
    sample = sample_examples(examples, 8, 0)
    templated = encode_sample(tok, sample, chat_template=True, salt=salt).fingerprint
    assert templated != encode_sample(tok, sample, chat_template=False, salt=salt).fingerprint
    assert set(read_scores(out / "score").sample_id) == {templated}
    results = json.loads((out / "results.json").read_text())
    assert results["encoding"] == {"chat_template": True, "score_sample": templated}
    assert json.loads((out / "config.json").read_text())["chat_template"] is True
    assert "Prompt format: the tokenizer's chat template" in (out / "report.md").read_text()

    def model(adapter=None):
        base = AutoModelForCausalLM.from_pretrained(str(chat_base), dtype=torch.float32)
        return PeftModel.from_pretrained(base, str(adapter)) if adapter else base

    def loss(m, template: bool) -> float:
        return evaluate(m, tok, examples, chat_template=template).loss

    # Finetuning and its validation curve: scratch's step-0 loss is the base's on templated prompts.
    base = model()
    log = pd.read_parquet(out / "arms" / "scratch" / "runs" / "seed0" / "log.parquet")
    step0 = log[(log.event == "eval") & (log.step == 0)].loss.iloc[0]
    assert step0 == pytest.approx(loss(base, True), abs=1e-5)
    assert abs(step0 - loss(base, False)) > 1e-3
    run = out / "arms" / "mashup" / "runs" / "seed0"
    assert json.loads((run / "adapter" / "finetune_info.json").read_text())["config"]["chat_template"] is True

    # The held-out evaluation of the report and the checkpoint merge's evaluation: templated too.
    final = model(run / "adapter")
    held = json.loads((run / "final_eval.json").read_text())["result"]["loss"]
    assert held == pytest.approx(loss(final, True), abs=1e-5) and abs(held - loss(final, False)) > 1e-3
    merged = model(run / "checkpoint_merge")
    evals = json.loads((run / "checkpoint_merge" / "evals.json").read_text())
    [val] = [v for k, v in evals.items() if k.startswith("val:")]
    assert val["loss"] == pytest.approx(loss(merged, True), abs=1e-5) and abs(val["loss"] - loss(merged, False)) > 1e-3

    # Rerun with everything cached (the checkpoint merges included): the recorded time does not move.
    timings = (out / "timings.json").read_text()
    assert set(json.loads(timings)) == {"score", "select+merge:mashup", "finetune:mashup/seed0", "finetune:scratch/seed0",
                                        "checkpoint_merge:mashup/seed0"}
    assert main(["run", "--config", str(path)]) == 0
    assert (out / "timings.json").read_text() == timings
