"""Fair arms: re-factoring a merge to the scratch LoRA's rank and alpha, and the random-norm null control.

ΔW after re-factoring is checked against torch's own SVD of the exact ΔW (Eckart–Young: the error is the dropped
singular values), the trainable parameter count against a fresh PEFT LoRA's, and random-norm's per-module norms
against the `linear` merge of the same donors.
"""
from __future__ import annotations

import hashlib

import pytest
import torch
from lora_math import delta_weights, exact_delta, read_config, read_factors

from engine.api import merge

TARGETS = ["q_proj", "v_proj"]


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_refactor_keeps_delta_w_up_to_the_truncation(donors, tmp_path):
    pair = [donors["qv1"], donors["qv3"]]
    exact = exact_delta(pair, [0.5, 0.5])
    full = merge(pair, method="cat", refactor_rank=16, refactor_alpha=32, out=tmp_path / "r16")
    low = merge(pair, method="cat", refactor_rank=4, refactor_alpha=8, out=tmp_path / "r4")
    assert (read_config(low)["r"], read_config(low)["lora_alpha"], read_config(low)["use_rslora"]) == (4, 8, False)
    for module, delta in delta_weights(full).items():  # rank 16 holds the cat merge's whole ΔW (rank Σ r_i = 16)
        torch.testing.assert_close(delta, exact[module], atol=1e-5, rtol=1e-4)
    for module, delta in delta_weights(low).items():
        s = torch.linalg.svdvals(exact[module])
        error = torch.linalg.matrix_norm(delta - exact[module]) ** 2
        assert error.item() == pytest.approx((s[4:] ** 2).sum().item(), rel=1e-3)
        assert torch.linalg.matrix_rank(delta).item() == 4


def test_refactored_arm_trains_as_many_parameters_as_scratch(donors, base_dir, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    merged = merge([donors["qv1"], donors["qv3"]], method="cat", refactor_rank=4, refactor_alpha=8,
                          out=tmp_path / "m")
    scratch = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base_dir)),
                             LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, task_type="CAUSAL_LM"))
    arm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_dir)), str(merged), is_trainable=True)
    assert trainable(arm) == trainable(scratch) == sum(a.numel() + b.numel() for a, b in read_factors(merged).values())
    assert arm.peft_config["default"].lora_alpha / arm.peft_config["default"].r == 2.0  # scratch's scale
    unfair = merge([donors["qv1"], donors["qv3"]], method="cat", out=tmp_path / "cat")
    assert sum(a.numel() + b.numel() for a, b in read_factors(unfair).values()) == 4 * trainable(scratch)


def test_random_norm_matches_the_merges_norms_and_nothing_else(donors, tmp_path):
    pair = [donors["qv1"], donors["qv3"]]
    linear = read_factors(merge(pair, method="linear", out=tmp_path / "linear"))
    null = merge(pair, method="random-norm", seed=7, out=tmp_path / "null")
    ours = read_factors(null)
    assert ours.keys() == linear.keys()
    for module, (a, b) in ours.items():
        la, lb = linear[module]
        assert a.shape == la.shape and b.shape == lb.shape
        assert torch.linalg.vector_norm(a).item() == pytest.approx(torch.linalg.vector_norm(la).item(), rel=1e-5)
        assert torch.linalg.vector_norm(b).item() == pytest.approx(torch.linalg.vector_norm(lb).item(), rel=1e-5)
        cosine = torch.nn.functional.cosine_similarity(a.flatten(), la.flatten(), dim=0).abs().item()
        assert cosine < 0.2, f"{module}: random-norm kept the merge's direction (|cos| {cosine:.2f})"
    assert read_config(null)["lora_alpha"] == read_config(tmp_path / "linear")["lora_alpha"]

    def digest(folder):
        return hashlib.sha256((folder / "adapter_model.safetensors").read_bytes()).hexdigest()

    again = merge(pair, method="random-norm", seed=7, out=tmp_path / "again")
    other = merge(pair, method="random-norm", seed=8, out=tmp_path / "other")
    assert digest(again) == digest(null) != digest(other)


def test_random_norm_loads_in_peft_and_changes_the_output(donors, base_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    null = merge([donors["qv1"], donors["qv3"]], method="random-norm", out=tmp_path / "null")
    base = AutoModelForCausalLM.from_pretrained(str(base_dir))
    ids = torch.tensor([[1, 5, 9, 13, 17]])
    with torch.no_grad():
        before = base(ids).logits
        after = PeftModel.from_pretrained(base, str(null))(ids).logits
    assert torch.isfinite(after).all() and not torch.allclose(before, after)
