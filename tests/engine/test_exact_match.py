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


def test_decode_stops_at_eos_and_matches_what_greedy_says(base_dir, tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base_dir))
    prompt = "abc"
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    out = model.generate(input_ids=ids, max_new_tokens=3, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    said = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    rows = [Example(prompt, said), Example(prompt, said + "zz"), Example(prompt + "d", "never said")]
    got = greedy_exact_match(model, tokenizer, rows, margin=0)
    assert got.n_examples == 3 and got.outputs[2] != "never said"
    assert got.n_correct == 1 + exact_match_text(got.outputs[1], said + "zz")
