"""Malformed and hostile donors in one real scoring job: each is reported by name and reason, the rest complete.

The kinds already covered elsewhere (tests/engine/test_scoring.py::test_malformed_donors_fail_with_reasons_while_others_complete,
tests/engine/test_validate.py) are not repeated; this fills the gaps: Inf weights, a header claiming a huge
tensor, a NaN scale, a pickle that would run code, a symlinked donor folder leaving the pool, duplicate ids.
"""
from __future__ import annotations
from engine.api import merge

import json
import pickle

import pytest

from engine.cli import main
from engine.core.errors import DonorError
from engine.scoring import ScoreConfig, score
from engine.scoring.store import read_scores

EXPECTED = {
    "inf_weights": "non-finite weights (NaN/Inf)",
    "huge_tensor": "does not fit the file",
    "nan_alpha": "non-finite loss",
    "pickle_bomb": "refusing to unpickle",
    "escaping": "outside the pool root",
    "donor1#dup": "duplicate donor id 'donor1'",
    "twice#dup": "duplicate donor id 'twice'",
}


@pytest.fixture(scope="module")
def hostile_job(ray_local, tmp_path_factory, pool_dir, faults, task_file, base_dir):
    manifest = faults / "dups.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "donor1", "path": "sym_pool/real"}, {"id": "twice", "path": "sym_pool/real"},
        {"id": "twice", "path": "inf_weights"}]))
    sources = [pool_dir / "qv", *(faults / k for k in ("inf_weights", "huge_tensor", "nan_alpha", "pickle_bomb")),
               faults / "sym_pool", manifest]
    cfg = ScoreConfig(base=str(base_dir), donors=[str(s) for s in sources], data=task_file,
                      out=tmp_path_factory.mktemp("hostile") / "out", samples=4, donors_per_call=4)
    return score(cfg), read_scores(cfg.out)


def test_each_hostile_donor_fails_by_name_with_its_reason(hostile_job):
    summary, df = hostile_job
    rows = df.set_index("donor")
    for name, phrase in EXPECTED.items():
        [match] = [d for d in rows.index if d == name or (name.endswith("#dup") and d.startswith(name))]
        assert rows.loc[match, "status"] == "failed" and phrase in rows.loc[match, "error"], (match, rows.loc[match, "error"])
    ok = ["__base__", "donor1", "donor3", "donor5", "real", "twice"]
    assert (rows.loc[ok, "status"] == "ok").all() and len(rows) == len(ok) + len(EXPECTED)
    assert summary.failed == len(EXPECTED) and df.donor.is_unique


def test_the_pickle_is_never_unpickled(hostile_job, faults, pool_dir, base_dir, task_file, tmp_path, pickle_bomb):
    pickle.loads(pickle.dumps(pickle_bomb(tmp_path / "live")))
    assert (tmp_path / "live").is_dir(), "the bomb must be live for its absence to prove anything"
    with pytest.raises(DonorError, match="refusing to unpickle"):
        merge([pool_dir / "qv" / "donor1", faults / "pickle_bomb"], out=tmp_path / "merged")
    assert main(["finetune", "--base", str(base_dir), "--data", str(task_file), "--init", str(faults / "pickle_bomb"),
                 "--out", str(tmp_path / "ft"), "--steps", "1"]) == 2
    assert not (faults / "UNPICKLED").exists(), "a donor's pickle was unpickled"
