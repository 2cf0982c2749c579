"""Merges of donors that differ in layer selectors, patterns and key spelling, checked against PEFT's own ΔW."""
from engine.api import merge
import json

import pytest
import torch

from engine.core.errors import DonorError
from tests.adapters import peft_deltas, peft_scalings, with_adapter_name_in_keys, write_peft_adapter
from tests.engine.merge.lora_math import linear_delta

QV = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def donors(base_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("mv")
    return {
        "layer0": write_peft_adapter(base_dir, root / "layer0", seed=1, r=8, lora_alpha=16, target_modules=QV,
                                     layers_to_transform=[0]),
        "layer1": write_peft_adapter(base_dir, root / "layer1", seed=2, r=8, lora_alpha=16, target_modules=QV,
                                     layers_to_transform=[1]),
        "alpha_pattern": write_peft_adapter(base_dir, root / "ap", seed=3, r=8, lora_alpha=16, target_modules=QV,
                                            alpha_pattern={"v_proj": 4}),
        "rank_pattern": write_peft_adapter(base_dir, root / "rp", seed=4, r=8, lora_alpha=16, target_modules=QV,
                                           rank_pattern={"v_proj": 4}),
        # alpha_pattern gives every module alpha 4: one scale 0.5 everywhere, not lora_alpha / r = 2
        "uniform_pattern1": write_peft_adapter(base_dir, root / "up1", seed=6, r=8, lora_alpha=16, target_modules=QV,
                                               alpha_pattern={"q_proj": 4, "v_proj": 4}),
        "uniform_pattern2": write_peft_adapter(base_dir, root / "up2", seed=7, r=8, lora_alpha=16, target_modules=QV,
                                               alpha_pattern={"q_proj": 4, "v_proj": 4}),
        "dora": write_peft_adapter(base_dir, root / "dora", seed=5, r=8, lora_alpha=16, target_modules=QV,
                                   use_dora=True),
    }


def expected(base_dir, folders, weights):
    total = {}
    for folder, w in zip(folders, weights):
        for module, delta in peft_deltas(base_dir, folder).items():
            total[module] = total.get(module, 0) + w * delta
    return total


@pytest.mark.parametrize("names", [("layer0", "layer1"), ("layer0", "alpha_pattern")])
def test_cat_keeps_every_donors_modules_when_loaded(base_dir, donors, tmp_path, names):
    """The first donor's layers_to_transform must not hide the second donor's layer; alpha_pattern scales count."""
    folders, weights = [donors[n] for n in names], [0.6, 0.4]
    out = merge(folders, weights=weights, method="cat", out=tmp_path / "m")
    config = json.loads((out / "adapter_config.json").read_text())
    assert "layers_to_transform" not in config and not config.get("alpha_pattern")
    got, want = peft_deltas(base_dir, out), expected(base_dir, folders, weights)
    assert got.keys() == want.keys()
    for module in want:
        torch.testing.assert_close(got[module], want[module], atol=1e-5, rtol=1e-5)


def test_linear_folds_per_module_scales(base_dir, donors, tmp_path):
    """alpha_pattern gives v_proj scale 0.5 and q_proj 2; layer0 adapts layer 0 only: the scales are folded into
    B (alpha = r), and the merge PEFT loads has ΔW = (Σ w_i s_i B_i)(Σ w_i A_i) in every module."""
    folders, weights = [donors["alpha_pattern"], donors["layer0"]], [0.3, 0.7]
    out = merge(folders, weights=weights, method="linear", out=tmp_path / "lin")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["lora_alpha"] == config["r"] == 8 and not config.get("alpha_pattern")
    got, want = peft_deltas(base_dir, out), linear_delta(base_dir, folders, weights)
    assert got.keys() == want.keys() == expected(base_dir, folders, weights).keys()
    for module in want:
        torch.testing.assert_close(got[module], want[module], atol=1e-5, rtol=1e-5)


def test_linear_keeps_a_shared_scale_that_alpha_pattern_sets(base_dir, donors, tmp_path):
    """Every module of both donors has scale 0.5 (alpha_pattern 4 at r=8, not lora_alpha/r = 2): the merge keeps
    that scale as its own, so PEFT loads ΔW = 0.5 (Σ w_i B_i)(Σ w_i A_i), not 2 (Σ w_i B_i)(Σ w_i A_i)."""
    folders, weights = [donors["uniform_pattern1"], donors["uniform_pattern2"]], [0.25, 0.75]
    assert set(peft_scalings(base_dir, folders[0]).values()) == set(peft_scalings(base_dir, folders[1]).values()) == {0.5}
    out = merge(folders, weights=weights, method="linear", out=tmp_path / "lin")
    config = json.loads((out / "adapter_config.json").read_text())
    assert not config.get("alpha_pattern") and config["r"] == 8
    assert set(peft_scalings(base_dir, out).values()) == {0.5}
    got, want = peft_deltas(base_dir, out), linear_delta(base_dir, folders, weights)
    assert got.keys() == want.keys() and len(want) == 4
    for module in want:
        torch.testing.assert_close(got[module], want[module], atol=1e-5, rtol=1e-5)


def test_adapter_name_keys_merge_into_peft_keys(base_dir, donors, tmp_path):
    named = with_adapter_name_in_keys(donors["alpha_pattern"], tmp_path / "named")
    out = merge([named], method="cat", out=tmp_path / "m")
    got, want = peft_deltas(base_dir, out), peft_deltas(base_dir, donors["alpha_pattern"])
    for module in want:
        torch.testing.assert_close(got[module], want[module], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name, reason", [("dora", "DoRA"), ("rank_pattern", "rank_pattern gives modules ranks")])
def test_unsupported_features_are_refused_in_one_line(donors, tmp_path, name, reason):
    with pytest.raises(DonorError, match=reason):
        merge([donors[name]], method="cat", out=tmp_path / name)
