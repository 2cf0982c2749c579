"""Merges of donors that differ in layer selectors, patterns and key spelling, checked against PEFT's own ΔW."""
from engine.api import merge
import json

import pytest
import torch

from engine.core.errors import DonorError
from tests.adapters import peft_deltas, with_adapter_name_in_keys, write_peft_adapter

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
    folders = [donors["alpha_pattern"], donors["layer0"]]
    out = merge(folders, weights=[0.5, 0.5], method="linear", out=tmp_path / "lin")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["lora_alpha"] == config["r"] == 8 and not config.get("alpha_pattern")
    assert peft_deltas(base_dir, out).keys() == expected(base_dir, folders, [0.5, 0.5]).keys()


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
