"""`finetune --init` from adapters as the Hub publishes them: it must start from exactly the adapter PEFT loads
(its step-0 evaluation equals an independent PEFT forward) and train; DoRA is refused in one line, as validation
(score) and merge refuse it."""
from engine.api import merge
import pytest
import torch

import engine
from engine.core.adapter import DORA_UNSUPPORTED
from engine.core.data import encode_sample, load_jsonl, sample_examples
from engine.core.errors import ConfigError, DonorError
from tests.adapters import peft_reference_loss
from engine.core.validate import base_spec, validate_donor
from tests.adapters import QV, hub_style_donors, write_peft_adapter
from tests.support.record import record

EVAL_N = 6


@pytest.fixture(scope="module")
def hub_style(base_dir, tmp_path_factory):
    return hub_style_donors(base_dir, tmp_path_factory.mktemp("ft-variety"))


@pytest.mark.parametrize("feature", ["rsLoRA", "rank/alpha patterns", "alpha_pattern", "layers_to_transform",
                                     "lora_bias", "adapter-name keys", "bf16 donor", "plain (mlp only)"])
def test_finetune_init_starts_from_the_adapter_peft_loads(base_dir, tokenizer, task_file, hub_style, tmp_path, feature):
    from engine.finetune import FinetuneConfig, finetune

    ours, reference = hub_style[feature]
    result = finetune(FinetuneConfig(base=str(base_dir), data=str(task_file), eval=str(task_file), init=str(ours),
                                     out=str(tmp_path / "ft"), steps=2, batch_size=4, lr=1e-3, progress=False,
                                     device="cpu", eval_samples=EVAL_N))
    sample = encode_sample(tokenizer, sample_examples(load_jsonl(task_file), EVAL_N, 0))
    want, _ = peft_reference_loss(base_dir, reference, sample)
    base_loss, _ = peft_reference_loss(base_dir, None, sample)
    assert abs(want - base_loss) > 1e-3, "the adapter must change the loss, or the check proves nothing"
    step0 = result.evals()[0]["loss"]
    tol = 2e-2 if feature == "bf16 donor" else 1e-5
    assert abs(step0 - want) < tol, (feature, step0, want)
    assert result.evals()[-1]["loss"] != step0, "it trained"
    record("features", feature, "finetune --init", "ok")


@pytest.fixture(scope="module")
def dora(base_dir, tmp_path_factory):
    return write_peft_adapter(base_dir, tmp_path_factory.mktemp("dora") / "dora", seed=5, r=8, lora_alpha=16,
                              target_modules=QV, use_dora=True)


def test_dora_is_refused_in_one_line_by_score_merge_and_finetune(base_dir, task_file, dora, tmp_path):
    from engine.finetune import FinetuneConfig, finetune

    with pytest.raises(DonorError, match="DoRA") as scored:
        validate_donor("dora", dora, base_spec(str(base_dir)))
    with pytest.raises(DonorError, match="DoRA") as merged:
        merge([dora], method="cat", out=tmp_path / "m")
    with pytest.raises(ConfigError, match="DoRA") as tuned:
        finetune(FinetuneConfig(base=str(base_dir), data=str(task_file), init=str(dora), out=str(tmp_path / "ft"),
                                steps=1, batch_size=4, progress=False, device="cpu"))
    assert not (tmp_path / "ft" / "adapter").exists()
    for where, exc in (("score (hf)", scored), ("merge", merged), ("finetune --init", tuned)):
        line = str(exc.value)
        assert "\n" not in line and line.endswith(DORA_UNSUPPORTED), (where, line)
        record("features", "DoRA", where, "refused")
