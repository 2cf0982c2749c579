import pytest

from engine.core.errors import DonorError
from engine.core.adapter import read_header
from engine.core.validate import base_spec, validate_donor


@pytest.fixture(scope="module")
def spec(base_dir):
    return base_spec(str(base_dir))


def test_spec_lists_linear_modules(spec):
    assert spec.modules["model.layers.0.self_attn.q_proj"] == (64, 64)
    assert spec.modules["model.layers.1.mlp.up_proj"] == (64, 128)


def test_good_donors_pass(spec, pool_dir):
    for folder in sorted(pool_dir.glob("*/*")):
        cfg = validate_donor(folder.name, folder, spec, root=str(pool_dir))
        assert cfg["peft_type"] == "LORA"


@pytest.mark.parametrize(
    "name",
    ["wrong_base", "missing_target", "rank_mismatch", "nan_weights", "truncated", "huge_header", "bin_only",
     "missing_config", "not_lora", "remote_code"],
)
def test_each_bad_donor_has_its_specific_reason(spec, bad_pool, name):
    root, expect = bad_pool
    with pytest.raises(DonorError) as info:
        validate_donor(name, root / name, spec, root=str(root))
    assert info.value.donor == name
    assert expect[name] in info.value.reason, info.value.reason


def test_header_is_checked_before_reading(bad_pool):
    root, _ = bad_pool
    with pytest.raises(ValueError, match="header claims"):
        read_header(root / "huge_header" / "adapter_model.safetensors")


def test_strict_base_name(spec, pool_dir):
    import json
    import shutil

    folder = pool_dir.parent / "renamed_base_donor"
    shutil.copytree(pool_dir / "qv" / "donor1", folder, dirs_exist_ok=True)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "someone/another-model"
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    validate_donor("renamed", folder, spec)  # same shapes: accepted by default
    with pytest.raises(DonorError, match="different base model"):
        validate_donor("renamed", folder, spec, strict_base_name=True)


def test_symlinked_weights_outside_root_are_refused(spec, pool_dir, tmp_path):
    root = tmp_path / "pool"
    (root / "d").mkdir(parents=True)
    src = pool_dir / "qv" / "donor1"
    (root / "d" / "adapter_config.json").write_bytes((src / "adapter_config.json").read_bytes())
    (root / "d" / "adapter_model.safetensors").symlink_to(src / "adapter_model.safetensors")
    with pytest.raises(DonorError, match="outside the pool root"):
        validate_donor("d", root / "d", spec, root=str(root))


def test_the_one_pass_finiteness_check_names_the_tensor_and_keeps_huge_finite_weights(tmp_path):
    import torch

    from engine.core.validate import check_finite_weights

    huge = {"a.lora_A.weight": torch.full((4, 8), 3e30), "a.lora_B.weight": torch.ones(8, 4, dtype=torch.bfloat16),
            "steps": torch.arange(3)}  # the norm of `huge` overflows float32; each value is finite
    check_finite_weights("d", tmp_path / "unused.safetensors", huge)
    for bad in (float("nan"), float("inf")):
        tensors = {**huge, "b.lora_B.weight": torch.ones(8, 4, dtype=torch.bfloat16)}
        tensors["b.lora_B.weight"][2, 1] = bad
        with pytest.raises(DonorError, match=r"non-finite weights \(NaN/Inf\) in b.lora_B.weight"):
            check_finite_weights("d", tmp_path / "unused.safetensors", tensors)
