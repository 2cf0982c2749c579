"""Real tasks from PyPI: BIG-bench's `task.json` files, read from the `bigbench==1.0.0` sdist, never installed.

The sdist (358 MB, Apache-2.0) holds every task's `task.json`. Installing it would pull TensorFlow, t5, seqio and
BLEURT, and pip 26 refuses it outright (its metadata declares a direct-URL dependency), so it is downloaded with a
pip that still accepts it (the system pip 23.2 here) into a stable per-machine cache that CI reuses, its sha256
recorded, and only the named tasks' `task.json` members are extracted, once, beside it.

Prompt format (raw text, no chat template): `example_input_prefix + input + example_output_prefix`, each prefix
only when the task declares it (they are how the task's authors ask it: "Today I walk. Yesterday I" → "walked"); a
task that declares no output prefix gets `"\\nAnswer:"` after its input (the format of the pilot in issue 20). The
prompt is stripped of surrounding whitespace. Trailing whitespace of the prompt moves to the
completion as one leading space, so the answer's first word is tokenized as it is in running text (" 109", not
" " + "109"). The chat template is off: BIG-bench scores raw prompts, and SmolLM2's template adds a ~30-token system
prompt to every row, which would double the cost of short tasks on CPU. `task_prefix` (a task-level instruction,
up to a paragraph in natural_instructions) is left out for the same reason; finetuning learns the task from rows.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any, Iterable

from engine.core.atomic import atomic_write_text
from engine.core.errors import ConfigError

SDIST = "bigbench-1.0.0.tar.gz"
SDIST_SHA256 = "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2"  # measured 2026-12-02 from PyPI
CACHE = Path(os.environ.get("MASHUP_BIGBENCH_CACHE", Path.home() / ".cache" / "mashup" / "bigbench"))
# The families issue 20 allows; the others are kept back for an independent check of the engine.
ALLOWED_FAMILIES = ("arithmetic", "linguistic_mappings", "multiemo", "natural_instructions", "elementary_math_qa",
                    "goal_step_wikihow", "logical_deduction", "simp_turing_concept", "word_unscrambling",
                    "periodic_elements")
DEFAULT_OUTPUT_PREFIX = "\nAnswer:"
_MEMBER_ROOT = "bigbench-1.0.0/bigbench/benchmark_tasks/"


def family_of(task: str) -> str:
    """`arithmetic/2_digit_addition` → `arithmetic`; a task without subtasks is its own family."""
    return task.split("/", 1)[0]


def check_allowed(tasks: Iterable[str]) -> None:
    """Refuse tasks of families outside the allowed list, by name, before anything is downloaded."""
    bad = sorted({t for t in tasks if family_of(t) not in ALLOWED_FAMILIES})
    if bad:
        raise ConfigError(f"tasks {bad} are not in the allowed BIG-bench families {list(ALLOWED_FAMILIES)}")


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _pip_that_accepts_it() -> list[str]:
    """pip 26 refuses the sdist; the system python's pip (23.2 on our machines) accepts it. MASHUP_BIGBENCH_PIP
    names another interpreter whose `-m pip` works (e.g. a throwaway venv with pip==23.2.1)."""
    chosen = os.environ.get("MASHUP_BIGBENCH_PIP")
    for candidate in ([chosen] if chosen else ["python3", "/usr/bin/python3", sys.executable]):
        try:
            out = subprocess.run([candidate, "-m", "pip", "--version"], capture_output=True, text=True, check=True).stdout
        except (OSError, subprocess.CalledProcessError):
            continue
        if int(out.split()[1].split(".")[0]) < 26:
            return [candidate, "-m", "pip"]
    raise ConfigError("no pip older than 26 found to download bigbench==1.0.0 (pip 26 refuses its metadata); "
                      "set MASHUP_BIGBENCH_PIP to a python whose pip is 23.x, e.g. a venv with pip==23.2.1")


class SdistUnavailable(ConfigError):
    """The package index did not give the sdist (on 2026-12-07 PyPI answered "This package version is not
    available" for bigbench 1.0.0, which it had served until 2026-12-04): the world cannot be built here."""


def ensure_sdist(cache: Path = CACHE) -> Path:
    """The sdist in the cache, downloaded when absent (about 16-30 s) and checked against its recorded sha256, so
    every machine builds its world from the same bytes. The check result is stamped, not recomputed each time.
    A copy obtained elsewhere works too: put it at `<cache>/bigbench-1.0.0.tar.gz`; the sha256 decides."""
    path = cache / SDIST
    stamp = cache / (SDIST + ".sha256")
    if path.exists() and stamp.exists() and stamp.read_text().strip() == f"{SDIST_SHA256} {path.stat().st_size}":
        return path
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        got = subprocess.run([*_pip_that_accepts_it(), "download", "--no-deps", "bigbench==1.0.0", "-d", str(cache)],
                             capture_output=True, text=True)
        if got.returncode or not path.exists():
            why = next((ln for ln in reversed(got.stderr.splitlines()) if ln.startswith("ERROR")), "no ERROR line")
            raise SdistUnavailable(f"could not download bigbench==1.0.0 from the package index ({why.strip()}); put "
                                   f"a copy of {SDIST} (sha256 {SDIST_SHA256[:12]}…) at {path}")
    digest = sha256_of(path)
    if digest != SDIST_SHA256:
        raise ConfigError(f"{path}: sha256 {digest} is not the recorded {SDIST_SHA256}; delete it to download again")
    atomic_write_text(stamp, f"{digest} {path.stat().st_size}\n")
    return path


def task_files(tasks: Iterable[str], cache: Path = CACHE) -> dict[str, Path]:
    """Each named task's extracted `task.json`; the missing ones are extracted in one pass over the sdist."""
    tasks = list(dict.fromkeys(tasks))
    check_allowed(tasks)
    root = cache / "tasks" / SDIST_SHA256[:12]
    want = {t: root / t / "task.json" for t in tasks}
    missing = {_MEMBER_ROOT + t + "/task.json": t for t, p in want.items() if not p.exists()}
    if missing:
        with tarfile.open(ensure_sdist(cache)) as tf:
            for member in tf:
                task = missing.pop(member.name, None)
                if task is not None:
                    data = tf.extractfile(member).read().decode("utf-8")
                    atomic_write_text(want[task], data)
                if not missing:
                    break
        if missing:
            raise ConfigError(f"tasks {sorted(missing.values())} are not in {SDIST} (names look like "
                              "'arithmetic/2_digit_addition' or 'word_unscrambling')")
    return want


def load_task(name: str, cache: Path = CACHE) -> dict[str, Any]:
    return json.loads(task_files([name], cache)[name].read_text())


def prompt_of(example: dict[str, Any], task: dict[str, Any]) -> tuple[str, str]:
    """(prompt without trailing whitespace, the separator it dropped as one leading space of the completion)."""
    text = task.get("example_input_prefix", "") + example["input"]
    out = task.get("example_output_prefix")
    text = text + out if out is not None else text.rstrip() + DEFAULT_OUTPUT_PREFIX
    return text.strip(), " "


def convert(example: dict[str, Any], task: dict[str, Any]) -> dict[str, Any]:
    """One BIG-bench example as a row of docs/contracts.md's JSONL: generation (`target`: a string or a list, the
    first one is the reference) gives prompt + completion; multiple choice (`target_scores`) adds `choices` in the
    file's order and `answer` = the first choice with the highest score, whose text is then the completion when
    the example has no `target`."""
    prompt, sep = prompt_of(example, task)
    row: dict[str, Any] = {"prompt": prompt}
    target = example.get("target")
    if isinstance(target, list):
        target = target[0] if target else None
    scores = example.get("target_scores")
    if scores:
        choices = [str(c).strip() for c in scores]
        values = list(scores.values())
        answer = values.index(max(values))
        row["choices"] = [sep + c for c in choices]
        row["answer"] = answer
        if target is None:
            target = choices[answer]
    if target is None or not str(target).strip():
        raise ValueError("example has neither a non-empty target nor target_scores")
    row["completion"] = sep + str(target).strip()
    return {"prompt": row["prompt"], "completion": row["completion"], **{k: row[k] for k in ("choices", "answer") if k in row}}


def task_rows(name: str, cache: Path = CACHE, max_prompt_chars: int | None = None, max_choices: int | None = None) -> list[dict]:
    """Every convertible example of a task, in the file's order; prompts longer than `max_prompt_chars` are dropped
    (short sequences are what a 2-core machine can afford), and so are the multiple-choice options beyond
    `max_choices` (the answer always kept, the others the file's first ones), so that a 118-way choice stays cheap."""
    task = load_task(name, cache)
    out = []
    for ex in task.get("examples", []):
        try:
            row = convert(ex, task)
        except (ValueError, KeyError):
            continue
        if max_prompt_chars is not None and len(row["prompt"]) > max_prompt_chars:
            continue
        if max_choices is not None and "choices" in row and len(row["choices"]) > max_choices:
            keep = [row["answer"]] + [i for i in range(len(row["choices"])) if i != row["answer"]][: max_choices - 1]
            keep.sort()
            row["choices"], row["answer"] = [row["choices"][i] for i in keep], keep.index(row["answer"])
        out.append(row)
    return out


def split(rows: list[dict], n_train: int, n_val: int, n_eval: int, seed: str) -> dict[str, list[dict]]:
    """Deterministic disjoint splits: one seeded shuffle (keyed by the task's name, so two tasks never share an
    order by accident), then held-out rows first, val next and train from the rest. A task with fewer rows than
    asked keeps held-out and val whole and trains on what remains (never on a held-out row)."""
    order = list(range(len(rows)))
    random.Random(f"bigbench/{seed}").shuffle(order)
    held, val = order[:n_eval], order[n_eval:n_eval + n_val]
    train = order[n_eval + n_val:n_eval + n_val + n_train]
    if not train or len(val) < n_val or len(held) < n_eval:
        raise ConfigError(f"{seed}: {len(rows)} rows cannot give {n_eval} held-out + {n_val} val rows and a train split")
    return {"train": [rows[i] for i in train], "val": [rows[i] for i in val], "eval": [rows[i] for i in held]}
