"""BIG-bench task.json files from the cached `bigbench==1.0.0` sdist (downloaded by the same function when absent,
about 16-30 s; `make bigbench-data` does it), converted to the project's JSONL rows. The expected rows are written
out by hand from the task files, so the prompt format and the target / target_scores rules are pinned."""
from __future__ import annotations

import pytest

from bench.world import bigbench as B
from engine.core.errors import ConfigError

TASKS = ["linguistic_mappings/past_tense_json", "goal_step_wikihow/step_inference",
         "natural_instructions/subtask047_misc_answering_science_questions", "arithmetic/2_digit_addition"]


@pytest.fixture(scope="module")
def files(bigbench_sdist):
    return B.task_files(TASKS)  # one pass over the cached sdist for whatever is not yet extracted


def test_sdist_is_the_recorded_one(files):
    sdist = B.ensure_sdist()
    assert sdist.name == "bigbench-1.0.0.tar.gz" and (sdist.parent / (sdist.name + ".sha256")).read_text().startswith(B.SDIST_SHA256)


def test_generation_example_converts_with_the_tasks_own_prefixes(files):
    task = B.load_task("linguistic_mappings/past_tense_json")
    assert task["examples"][0] == {"input": "abandon", "target": "abandoned", "comment": "regular"}
    assert B.convert(task["examples"][0], task) == {"prompt": "Today I abandon. Yesterday I", "completion": " abandoned"}


def test_multiple_choice_example_gives_choices_and_the_argmax_answer(files):
    task = B.load_task("goal_step_wikihow/step_inference")
    ex = task["examples"][0]
    assert ex["input"] == "The most reasonable step of 'Solve an Algebraic Expression' is "
    assert B.convert(ex, task) == {
        "prompt": "The most reasonable step of 'Solve an Algebraic Expression' is\nAnswer:",
        "completion": " Know the order of operations",
        "choices": [" Learn how to observe your own thoughts", " Perform a waste audit", " Know the order of operations",
                    " Find your loan information"],
        "answer": 2,
    }


def test_list_target_takes_the_first_and_both_kinds_keep_target_as_completion(files):
    ni = B.load_task("natural_instructions/subtask047_misc_answering_science_questions")
    assert B.convert(ni["examples"][0], ni)["completion"] == " D."
    arith = B.load_task("arithmetic/2_digit_addition")
    row = B.convert(arith["examples"][0], arith)
    assert row["prompt"] == "What is 80 plus 29?\nAnswer:" and row["completion"] == " 109"
    assert row["choices"][row["answer"]] == " 109" and len(row["choices"]) == 7


def test_splits_are_disjoint_and_deterministic(files):
    rows = B.task_rows("linguistic_mappings/past_tense_json")
    a = B.split(rows, 50, 10, 20, seed="x")
    assert a == B.split(rows, 50, 10, 20, seed="x")
    prompts = [{r["prompt"] for r in a[k]} for k in ("train", "val", "eval")]
    assert [len(p) for p in prompts] == [50, 10, 20] and not (prompts[0] & prompts[2]) and not (prompts[1] & prompts[2])
    with pytest.raises(ConfigError, match="cannot give"):
        B.split(rows[:25], 50, 10, 20, seed="x")


def test_families_outside_the_allowed_list_are_refused_by_name():
    with pytest.raises(ConfigError, match="bbq_lite_json"):
        B.task_files(["bbq_lite_json/age_ambig", "arithmetic/2_digit_addition"])


def test_an_sdist_the_index_no_longer_serves_is_one_line_naming_the_fix(tmp_path, monkeypatch):
    """What a machine sees since the index stopped serving bigbench 1.0.0: pip's own ERROR line and where to put a
    copy, as a ConfigError (one line in the CLI), never a CalledProcessError traceback."""
    import sys

    fake_pip = [sys.executable, "-c", "import sys; print('ERROR: No matching distribution found for bigbench==1.0.0', "
                                      "file=sys.stderr); sys.exit(1)"]
    monkeypatch.setattr(B, "_pip_that_accepts_it", lambda: fake_pip)
    with pytest.raises(B.SdistUnavailable, match=r"No matching distribution found.*put a copy of bigbench-1\.0\.0"):
        B.ensure_sdist(tmp_path)
    assert isinstance(B.SdistUnavailable("x"), ConfigError)
