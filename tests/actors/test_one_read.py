"""A small donor's weights are read once by the scorer: the same bytes give its fingerprint, its finiteness check
and its slot load; a file above the preload size takes the per-tensor path, and both give the same rows."""
import hashlib

import pytest

import actors.lora_slots
import engine.core.adapter
import engine.core.weights
from actors.scorer import DonorScorer, ScoreTask
from engine.core.adapter import WEIGHTS_FILE, combine_fingerprint, sha256_file
from engine.core.data import encode_sample, load_jsonl
from engine.core.donor import DonorEntry

VALIDATION = {"strict_base_name": False, "check_finite": True}


@pytest.fixture(scope="module")
def sample(tokenizer, task_file):
    return encode_sample(tokenizer, load_jsonl(task_file)[:6])


def _tasks(pool_dir):
    folders = sorted(p for p in (pool_dir / "qv").iterdir() if p.is_dir())[:3]
    return [ScoreTask(DonorEntry(f.name, str(f), root=str(pool_dir)), i + 1) for i, f in enumerate(folders)]


def _forbid(*_args, **_kwargs):
    raise AssertionError("the weights file was opened a second time")


def test_small_donors_are_read_once_and_keyed_by_the_bytes_scored(base_dir, pool_dir, sample, monkeypatch):
    import safetensors

    reads, real_read, real_sha = [], engine.core.weights.read_weights, engine.core.adapter.sha256_file

    def counting_read(path, *args):
        reads.append(str(path))
        return real_read(path, *args)

    def sha_of_configs_only(path):
        assert not str(path).endswith(WEIGHTS_FILE), "the weights were hashed from a second read"
        return real_sha(path)

    monkeypatch.setattr(actors.lora_slots, "safe_open", _forbid)  # the slot load uses the scorer's tensors
    monkeypatch.setattr(safetensors, "safe_open", _forbid)  # so does the finiteness check
    monkeypatch.setattr(engine.core.adapter, "sha256_file", sha_of_configs_only)
    monkeypatch.setattr(engine.core.weights, "read_weights", counting_read)
    scorer = DonorScorer("hf", str(base_dir), {"max_resident": 8}, VALIDATION)
    tasks = _tasks(pool_dir)
    rows = scorer.score([None, *tasks], sample)
    assert all(r["status"] == "ok" for r in rows), [r["error"] for r in rows]
    assert reads == [f"{t.entry.path}/{WEIGHTS_FILE}" for t in tasks], "one whole read per donor"
    for task, row in zip(tasks, rows[1:]):
        data = open(f"{task.entry.path}/{WEIGHTS_FILE}", "rb").read()
        assert row["donor_sha256"] == combine_fingerprint(real_sha(f"{task.entry.path}/adapter_config.json"),
                                                          hashlib.sha256(data).hexdigest())


def test_large_files_take_the_per_tensor_path_and_score_the_same(base_dir, pool_dir, sample, monkeypatch):
    scorer = DonorScorer("hf", str(base_dir), {"max_resident": 8}, VALIDATION)
    once = scorer.score([None, *_tasks(pool_dir)], sample)
    monkeypatch.setattr(engine.core.weights.read_weights, "__defaults__", (0,))  # every file is "large"
    scorer = DonorScorer("hf", str(base_dir), {"max_resident": 8}, VALIDATION)
    per_tensor = scorer.score([None, *_tasks(pool_dir)], sample)
    for a, b in zip(once, per_tensor):
        assert a["status"] == b["status"] == "ok"
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-7) and a["donor_sha256"] == b["donor_sha256"]
