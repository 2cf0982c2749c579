"""A merged adapter is a plain PEFT adapter: it loads unchanged and its forward is the base plus the expected ΔW."""
from __future__ import annotations

import pytest
import torch
from lora_math import exact_delta, read_factors, read_scale

from engine.api import merge

PREFIX = "base_model.model."


def base_with_delta(base_dir, deltas: dict[str, torch.Tensor]):
    """The base model with ΔW added to each adapted weight: the independent reference."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir))
    with torch.no_grad():
        for module, delta in deltas.items():
            model.get_submodule(module.removeprefix(PREFIX)).weight += delta
    return model.eval()


def peft_logits(base_dir, adapter, input_ids):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base_dir)), str(adapter)).eval()
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def linear_delta(inputs, weights):
    factors = [read_factors(p) for p in inputs]
    scales = [read_scale(p) for p in inputs]
    return {m: sum(w * s * f[m][1] for w, s, f in zip(weights, scales, factors))
            @ sum(w * f[m][0] for w, f in zip(weights, factors)) for m in factors[0]}


def svd_delta(inputs, weights, rank):
    out = {}
    for module, delta in exact_delta(inputs, weights).items():
        u, s, vh = torch.linalg.svd(delta.double())
        out[module] = ((u[:, :rank] * s[:rank]) @ vh[:rank]).float()
    return out


CASES = {
    "linear": (("qv1", "scaled"), [0.3, 0.7], lambda i, w: linear_delta(i, w)),
    "cat": (("qv1", "qkvo2", "qkvo4"), [0.5, 0.25, 0.25], lambda i, w: exact_delta(i, w)),
    "svd": (("qv1", "qkvo2", "qv3"), [0.4, 0.4, 0.2], lambda i, w: svd_delta(i, w, 8)),
}


@pytest.mark.parametrize("method", sorted(CASES))
def test_merged_adapter_loads_in_peft_and_forward_matches_expected_delta(method, donors, scaled_donor, base_dir, tmp_path):
    names, weights, expected = CASES[method]
    inputs = [scaled_donor if n == "scaled" else donors[n] for n in names]
    out = merge(inputs, weights=weights, method=method, out=tmp_path / method)
    input_ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(0))
    reference = base_with_delta(base_dir, expected(inputs, weights))
    with torch.no_grad():
        want = reference(input_ids=input_ids).logits
        base_logits = base_with_delta(base_dir, {})(input_ids=input_ids).logits
    got = peft_logits(base_dir, out, input_ids)
    assert (want - base_logits).abs().max() > 1e-2  # the merge changes the outputs, so the check has teeth
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
