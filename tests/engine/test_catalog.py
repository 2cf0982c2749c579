import json

import pytest

from engine.scoring.catalog import build_catalog, from_directory
from engine.core.errors import ConfigError


def test_directory_ids_are_relative_paths(pool_dir):
    ids = [e.donor for e in from_directory(pool_dir)]
    assert ids == ["qkvo/donor2", "qkvo/donor4", "qv/donor1", "qv/donor3", "qv/donor5"]


def test_manifest_paths_cannot_escape(escaping_manifest):
    entries = {e.donor: e for e in build_catalog([str(escaping_manifest)])}
    for donor in ("escape", "symlinked", "absolute"):
        assert "escapes the manifest folder" in entries[donor].error


def test_manifest_keeps_metadata_and_resolves_relative(tmp_path, pool_dir):
    import shutil

    shutil.copytree(pool_dir / "qv" / "donor1", tmp_path / "d1")
    (tmp_path / "m.jsonl").write_text(json.dumps({"id": "x", "path": "d1", "step": 500}) + "\n")
    [entry] = build_catalog([str(tmp_path / "m.jsonl")])
    assert entry.error is None and entry.meta == {"step": 500} and entry.path == str(tmp_path / "d1")


def test_duplicate_ids_are_reported_not_dropped(tmp_path, pool_dir):
    import shutil

    shutil.copytree(pool_dir / "qv" / "donor1", tmp_path / "d1")
    rows = [{"id": "same", "path": "d1"}, {"id": "same", "path": "d1"}]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    entries = build_catalog([str(tmp_path / "m.jsonl")])
    assert len(entries) == 2 and entries[0].error is None
    assert "duplicate donor id 'same'" in entries[1].error


def test_hub_sources_parse_revision():
    [entry] = build_catalog(["hf://org/adapter@v2"])
    assert entry.donor == "org/adapter@v2" and entry.is_hub and entry.revision == "v2"


def test_unknown_source_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="not a folder"):
        build_catalog([str(tmp_path / "nope")])
    with pytest.raises(ConfigError, match="no adapters found"):
        build_catalog([str(tmp_path)])


def test_paths_are_absolute_whatever_the_cwd(pool_dir, monkeypatch):
    import os

    monkeypatch.chdir(pool_dir.parent)
    entries = build_catalog(["pool"])
    assert all(os.path.isabs(e.path) and os.path.isdir(e.path) for e in entries)


def test_a_local_id_reused_for_a_hub_donor_is_rescored(pool_dir):
    """The row of id `donor1` was scored from a local folder; the manifest now points that id at a Hub repo."""
    import pandas as pd

    from engine.core.donor import DonorEntry
    from engine.scoring.catalog import stale_donors

    commit = "a" * 40
    rows = pd.DataFrame([{"donor": "donor1", "status": "ok", "sample_id": "s", "path": str(pool_dir / "qv" / "donor1"),
                          "donor_stat": "whatever", "revision": None}])
    hub = DonorEntry("donor1", f"hf://org/donor1@{commit}", revision=commit)
    assert stale_donors([hub], rows, "s") == {"donor1"}
    same_repo = rows.assign(path=f"hf://org/donor1@{commit}", revision=commit)
    assert stale_donors([hub], same_repo, "s") == set()
    other_repo = rows.assign(path=f"hf://other/donor1@{commit}", revision=commit)
    assert stale_donors([hub], other_repo, "s") == {"donor1"}
