"""Greedy exact match: the string rule on known strings, then the decode on the tiny world's model."""
from __future__ import annotations

from engine.core.data import Example
from engine.evaluate import exact_match_text, greedy_exact_match


def test_trailing_whitespace_and_the_leading_space_do_not_count():
    assert exact_match_text(" 109 ", " 109")
    assert exact_match_text("109\n", " 109")
    assert exact_match_text("abandoned  \t", " abandoned")


def test_a_continuation_is_cut_at_the_first_newline_unless_the_reference_has_one():
    assert exact_match_text(" 109\nWhat is 3 plus 4?", " 109")
    assert not exact_match_text(" 109 and more", " 109")
    assert not exact_match_text(" a\nb", " a\nb c") and exact_match_text(" a\nb", " a\nb")


def test_eos_ends_the_answer():
    assert exact_match_text(" 109<|im_end|>", " 109", eos="<|im_end|>")
    assert exact_match_text(" 109 \n<|im_end|>What is", " 109", eos="<|im_end|>")
    assert not exact_match_text(" 10<|im_end|>9", " 109", eos="<|im_end|>")
    assert not exact_match_text(" 109<|im_end|>", " 109")  # without being told, the EOS text is part of the answer


def test_different_answers_do_not_match():
    assert not exact_match_text(" 1090", " 109")
    assert not exact_match_text("", " 109")
    assert not exact_match_text(" Abandoned", " abandoned")  # case matters: the reference is the answer


def test_greedy_decode_matches_what_the_model_says_within_the_budget(base_dir, tokenizer):
    """A reference equal to the model's own 3-token greedy continuation matches with margin 0; the same reference
    plus more text does not (the budget follows the reference's length, the answer must be all of it)."""
    import pytest
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir))
    for prompt in ("abc", "hello", "xyz", "12", "the", "a b c"):
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        out = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        new = out[0, ids.shape[1]:].tolist()
        said = tokenizer.decode(new, skip_special_tokens=True)
        if tokenizer.eos_token_id not in new and tokenizer(said, add_special_tokens=False)["input_ids"] == new and said.strip():
            break
    else:
        pytest.skip("no prompt whose greedy continuation round-trips through the tokenizer")
    got = greedy_exact_match(model, tokenizer, [Example(prompt, said), Example(prompt, said + " never said")], margin=0)
    assert got.outputs[0] == said and got.n_correct == 1
