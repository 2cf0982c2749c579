"""A saved state decodes to what was saved: types kept (int slot keys, tuples, enums as ints), tensors exact, and an
object that is not data (DeepSpeed's LossScaler) taken back from the live object's state."""
from __future__ import annotations

from enum import IntEnum

import pytest
import torch

from engine.finetune.state_codec import KEPT, fill_kept, read_tree, write_tree


class Stage(IntEnum):
    gradients = 2


def test_an_optimizer_state_round_trips_and_loads(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.99))
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    flat = torch.arange(6.0)
    write_tree(tmp_path, "x", {"opt": opt.state_dict(), "stage": Stage.gradients, "scaler": object(),
                               "views": [flat[:3], flat[3:]], "none": None})
    back = read_tree(tmp_path, "x")
    assert sorted(back["opt"]["state"]) == [0, 1] and back["opt"]["param_groups"][0]["betas"] == (0.8, 0.99)
    for slot, saved in opt.state_dict()["state"].items():
        assert all(torch.equal(back["opt"]["state"][slot][k], v) for k, v in saved.items())
    assert back["stage"] == 2 and type(back["stage"]) is int and back["none"] is None
    assert [v.tolist() for v in back["views"]] == [[0, 1, 2], [3, 4, 5]]  # two views of one buffer, saved apart
    assert back["scaler"] is KEPT and fill_kept(back, {"scaler": "live"})["scaler"] == "live"
    fresh = torch.optim.AdamW(torch.nn.Linear(3, 2).parameters(), lr=1.0)
    fresh.load_state_dict(back["opt"])
    assert fresh.param_groups[0]["lr"] == 1e-2


def test_a_key_that_is_neither_int_nor_str_is_refused(tmp_path):
    with pytest.raises(TypeError, match="neither an int nor a str"):
        write_tree(tmp_path, "x", {(1, 2): 3})


def test_where_a_deepspeed_run_runs_is_not_part_of_its_identity(make_config, tmp_path):
    def cfg(**ds):
        return make_config(tmp_path / "o", executor="deepspeed", deepspeed={"num_workers": 2, **ds})

    same = cfg().identity()
    assert cfg(max_failures=0, storage_path="s3://b/p", placement_strategy="SPREAD").identity() == same
    assert cfg(zero_stage=3).identity() != same
