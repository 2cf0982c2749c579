"""`mashup merge` from the command line: flags, config files, selections, and one-line user errors."""
from __future__ import annotations

import json

import pandas as pd
import pytest
from lora_math import read_config

from engine.cli import main


def test_select_then_merge_from_the_selection(donors, tmp_path, capsys):
    rows = [{"donor": "__base__", "loss": 2.0, "status": "ok", "sample_id": "s", "path": None, "meta": "{}"}]
    rows += [{"donor": name, "loss": loss, "status": "ok", "sample_id": "s", "path": str(donors[name]), "meta": "{}"}
             for name, loss in (("qv1", 1.0), ("qv3", 1.5), ("qv5", 3.0))]
    for i, row in enumerate(rows):
        row.update(token_accuracy=0.0, n_examples=1, n_tokens=1, error=None, backend="hf", seconds=0.0,
                   revision=None, round=0, written_at=float(i))
    pd.DataFrame(rows).to_parquet(tmp_path / "scores.parquet", index=False)
    selection = tmp_path / "selection.json"
    assert main(["select", "--scores", str(tmp_path), "--k", "2", "--weighting", "mwa", "--penalty", "1",
                 "--below-base", "--out", str(selection)]) == 0
    assert main(["merge", "--selection", str(selection), "--out", str(tmp_path / "merged")]) == 0
    info = json.loads((tmp_path / "merged" / "merge_info.json").read_text())
    assert info["donors"] == ["qv1", "qv3"] and info["weights"] == pytest.approx([0.6, 0.4])
    assert "merged 2 donors (linear" in capsys.readouterr().out


def test_flags_and_config_file(donors, tmp_path):
    out = tmp_path / "cat"
    assert main(["merge", "--donors", str(donors["qv1"]), str(donors["qkvo2"]), "--weights", "1", "3",
                 "--method", "cat", "--out", str(out)]) == 0
    assert read_config(out)["r"] == 12
    config = tmp_path / "merge.yaml"
    config.write_text(f"donors: [{donors['qv1']}, {donors['qv3']}]\nmethod: ties\ndensity: 0.5\nout: {tmp_path / 'ties'}\n")
    assert main(["merge", "--config", str(config), "--density", "0.3"]) == 0
    assert json.loads((tmp_path / "ties" / "merge_info.json").read_text())["options"]["density"] == 0.3


@pytest.mark.parametrize("argv_tail,needle", [
    (["--method", "linear"], "needs donors of equal rank"),
    (["--method", "ties"], "density: required"),
])
def test_user_errors_exit_2_with_one_line(donors, tmp_path, capsys, argv_tail, needle):
    argv = ["merge", "--donors", str(donors["qv1"]), str(donors["qkvo2"]), "--out", str(tmp_path / "x"), *argv_tail]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0]
    assert not (tmp_path / "x").exists()


def test_python_api_is_exported_and_import_engine_stays_light():
    import subprocess
    import sys

    script = ("import sys, engine; assert 'torch' not in sys.modules and 'pandas' not in sys.modules; "
              "from engine.api import merge, select; import engine.merge; "
              "assert callable(merge) and callable(select) and not callable(engine.merge)")
    subprocess.run([sys.executable, "-c", script], check=True)


def test_hub_donors_merge_from_the_local_hf_cache(donors, tmp_path):
    import os
    from pathlib import Path

    from tests.helpers import publish_to_hf_cache

    publish_to_hf_cache(Path(os.environ["HF_HUB_CACHE"]), "acme/merge-donor", donors["qv3"], revision="v2")
    out = tmp_path / "merged"
    assert main(["merge", "--donors", str(donors["qv1"]), "hf://acme/merge-donor@v2", "--out", str(out)]) == 0
    info = json.loads((out / "merge_info.json").read_text())
    assert info["donors"][1] == "hf://acme/merge-donor@v2"
    assert main(["merge", "--donors", "hf://acme/absent", "--out", str(tmp_path / "x")]) == 2
