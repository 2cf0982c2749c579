"""The architecture matrix: for each family people publish LoRAs for (tests/archs.py), real PEFT adapters are
validated, scored by the hf backend, merged (linear, cat, svd) and finetuned from, each against PEFT itself.

Checked per architecture: hf scores equal an independent transformers + PEFT forward to 1e-5 (float32); every merge
loads with `PeftModel.from_pretrained` and its ΔW equals the one computed from the donors' own PEFT ΔW; a
`finetune --init` run starts from exactly the merged adapter (its step-0 evaluation equals PEFT's loss of it) and
trains. The vLLM column lives in tests/actors/test_vllm_arch.py. Outcomes go to bench/results/support.json.
"""
from __future__ import annotations

from engine.api import merge
import pytest
import torch

import engine
from actors.backends.base import BASE, DonorRequest
from actors.backends.hf import HFBackend, HFOptions
from engine.core.data import encode_sample, load_jsonl, sample_examples
from tests.adapters import peft_reference_loss
from engine.core.validate import base_spec, validate_donor
from tests.adapters import peft_deltas, write_peft_adapter
from tests.archs import ARCHS, build_arch
from tests.support.record import record

NAMES = sorted(ARCHS)
_BUILT: dict[str, dict] = {}


@pytest.fixture(scope="session")
def arch_world(tokenizer, tmp_path_factory):
    """name → {base, donors, sample}: one tiny model and two donors per architecture, built once per session."""
    def get(name: str) -> dict:
        if name not in _BUILT:
            arch, root = ARCHS[name], tmp_path_factory.mktemp(f"arch-{name}")
            base = build_arch(arch, root / "base", tokenizer)
            targets = list(arch.targets)
            donors = [write_peft_adapter(base, root / f"d{i}", seed=10 + i, init_std=0.3, r=4, lora_alpha=8,
                                         target_modules=targets) for i in range(2)]
            _BUILT[name] = {"base": base, "donors": donors, "root": root}
        return _BUILT[name]
    return get


@pytest.fixture(scope="module")
def sample(tokenizer, task_file):
    return encode_sample(tokenizer, load_jsonl(task_file)[:6])


def _delta_close(got: torch.Tensor, want: torch.Tensor, where: str) -> None:
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4, msg=lambda m: f"{where}: {m}")


@pytest.mark.parametrize("name", NAMES)
def test_hf_scores_equal_peft(arch_world, sample, name):
    w = arch_world(name)
    spec = base_spec(str(w["base"]))
    for i, d in enumerate(w["donors"]):
        validate_donor(f"d{i}", d, spec)
    backend = HFBackend(str(w["base"]), HFOptions(max_resident=4, batch_tokens=512, device="cpu", dtype="float32"))
    reqs = [DonorRequest(BASE, "", 0)] + [DonorRequest(f"d{i}", str(d), i + 1) for i, d in enumerate(w["donors"])]
    scores = backend.score(reqs, sample)
    for req, s in zip(reqs, scores):
        want, _ = peft_reference_loss(w["base"], None if req.is_base else req.path, sample)
        assert s.error is None, (name, req.donor, s.error)
        assert abs(s.loss - want) < 1e-5, (name, req.donor, s.loss, want)
    assert abs(scores[1].loss - scores[0].loss) > 1e-3, "the donors must change the loss, or parity proves nothing"
    record("architectures", name, "score (hf)", "ok")


def _expected_delta(method: str, base, donors, weights) -> dict[str, torch.Tensor]:
    """cat and svd (at full rank): Σ w_i ΔW_i from PEFT's own ΔW of each donor. linear (the paper's mean of the
    factors): s · (Σ w_i B_i)(Σ w_i A_i), with PEFT's ΔW of a one-donor stand-in giving the layout (fan_in_fan_out)."""
    if method in ("cat", "svd"):
        total: dict[str, torch.Tensor] = {}
        for d, w in zip(donors, weights):
            for module, delta in peft_deltas(base, d).items():
                total[module] = total.get(module, 0) + w * delta
        return total
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    models = [PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(d)) for d in donors]
    out = {}
    for (name, mod), *others in zip(*(m.named_modules() for m in models)):
        if not (hasattr(mod, "get_delta_weight") and "default" in getattr(mod, "lora_A", {})):
            continue
        mods = [mod] + [o[1] for o in others]
        with torch.no_grad():
            a = sum(w * m.lora_A["default"].weight for m, w in zip(mods, weights))
            b = sum(w * m.lora_B["default"].weight for m, w in zip(mods, weights))
            delta = (b @ a) * mod.scaling["default"]
        out[name.removeprefix("base_model.model.")] = delta.T if mod.fan_in_fan_out else delta
    return out


@pytest.mark.parametrize("method", ["linear", "cat", "svd"])
@pytest.mark.parametrize("name", NAMES)
def test_merges_load_in_peft_with_the_expected_delta(arch_world, tmp_path, name, method):
    w = arch_world(name)
    weights = [0.7, 0.3]
    extra = {"svd_rank": 8} if method == "svd" else {}  # the sum of the ranks: the SVD is exact
    out = merge(w["donors"], weights=weights, method=method, out=tmp_path / method, **extra)
    got, want = peft_deltas(w["base"], out), _expected_delta(method, w["base"], w["donors"], weights)
    assert got.keys() == want.keys() and want, (name, method, sorted(got), sorted(want))
    for module in want:
        _delta_close(got[module], want[module], f"{name} {method} {module}")
    w.setdefault("merged", {})[method] = out
    record("architectures", name, f"merge {method}", "ok")


@pytest.mark.parametrize("name", NAMES)
def test_finetune_from_the_merge_starts_at_its_loss(arch_world, task_file, tmp_path, name):
    from transformers import AutoTokenizer

    from engine.finetune import FinetuneConfig, finetune

    w = arch_world(name)
    init = w.get("merged", {}).get("cat") or merge(w["donors"], method="cat", out=tmp_path / "cat")
    result = finetune(FinetuneConfig(base=str(w["base"]), data=str(task_file), eval=str(task_file), init=str(init),
                                     out=str(tmp_path / "ft"), steps=2, batch_size=4, lr=1e-3, progress=False,
                                     device="cpu", eval_samples=6))
    step0 = result.evals()[0]
    held_out = sample_examples(load_jsonl(task_file), 6, 0)  # the subset eval_samples=6 takes with seed 0
    sample = encode_sample(AutoTokenizer.from_pretrained(str(w["base"])), held_out)
    want, _ = peft_reference_loss(w["base"], init, sample)
    assert abs(step0["loss"] - want) < 1e-5, (name, step0["loss"], want)
    assert all(torch.isfinite(torch.tensor(x)) for x in result.train_losses())
    assert (result.adapter / "adapter_model.safetensors").exists()
    record("architectures", name, "finetune --init", "ok")

