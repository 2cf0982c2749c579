"""evaluate() against a naive reference: one unpadded example at a time, full logits, torch cross-entropy."""
from __future__ import annotations

import pytest
import torch

from engine.core.data import load_jsonl
from engine.evaluate import EvalResult, evaluate


@pytest.fixture(scope="module")
def donor_model(base_dir, pool_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_dir))
    model = PeftModel.from_pretrained(base, str(pool_dir / "qkvo" / "donor2"))
    model.eval()
    return model


def naive_completion(model, tokenizer, prompt: str, completion: str) -> tuple[float, int, int]:
    """(summed NLL, argmax hits, tokens) of completion+EOS after the prompt, tokenized by hand."""
    p = tokenizer(prompt)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ids = torch.tensor([p + c])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(p) - 1:-1].double()
    target = torch.tensor(c)
    nll = torch.nn.functional.cross_entropy(logits, target, reduction="sum")
    return float(nll), int((logits.argmax(-1) == target).sum()), len(c)


def test_loss_token_and_choice_accuracy_match_naive_reference(donor_model, tokenizer, task_file):
    examples = load_jsonl(task_file)[:8]
    got = evaluate(donor_model, tokenizer, examples, batch_tokens=256)

    ref = [naive_completion(donor_model, tokenizer, ex.prompt, ex.completion) for ex in examples]
    assert got.n_tokens == sum(r[2] for r in ref)
    assert got.n_correct_tokens == sum(r[1] for r in ref)
    assert got.loss == pytest.approx(sum(r[0] for r in ref) / got.n_tokens, abs=1e-5)

    picks = []
    for ex in examples:
        nlls = [naive_completion(donor_model, tokenizer, ex.prompt, c)[0] for c in ex.choices]
        picks.append(min(range(len(nlls)), key=nlls.__getitem__))
    assert got.n_choice_examples == len(examples)
    assert got.accuracy == pytest.approx(sum(p == ex.answer for p, ex in zip(picks, examples)) / len(examples))


def test_shards_add_up_to_the_whole_and_train_mode_is_restored(donor_model, tokenizer, task_file):
    examples = load_jsonl(task_file)
    donor_model.train()
    whole = evaluate(donor_model, tokenizer, examples)
    assert donor_model.training
    donor_model.eval()
    parts = [evaluate(donor_model, tokenizer, examples[r::3], batch_tokens=128) for r in range(3)]
    total = EvalResult.from_tensor(sum(p.to_tensor() for p in parts))
    assert (total.n_tokens, total.n_correct_tokens, total.n_examples) == (whole.n_tokens, whole.n_correct_tokens, 24)
    assert total.n_choice_correct == whole.n_choice_correct
    assert total.loss == pytest.approx(whole.loss, abs=1e-6)
    assert (parts[0] + parts[1] + parts[2]).nll_sum == pytest.approx(whole.nll_sum, abs=1e-4)


def test_examples_without_choices_have_no_choice_accuracy(donor_model, tokenizer, world):
    from bench.world.tiny import write_task

    examples = load_jsonl(write_task(world / "plain.jsonl", 5, seed=4))
    result = evaluate(donor_model, tokenizer, examples)
    assert result.accuracy is None and result.n_examples == 5
    assert result.summary()["loss"] == result.loss > 0
