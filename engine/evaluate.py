"""Held-out evaluation of a causal LM (plain or PEFT): completion-token loss, token accuracy, multiple-choice accuracy,
and greedy exact match on generation rows (`greedy_exact_match`).

Results are kept as sums, not means, so that shards evaluated on different workers add up exactly to the result
of one process (docs/contracts.md, "Task data": the loss is token-weighted). The math is `engine.core.losses`, the
same as scoring, so a step-0 evaluation of an adapter equals its score.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Sequence

import torch

from engine.core.losses import chunk_by_tokens, completion_stats, left_pad, model_inputs
from engine.core.data import Encoded, Example, encode_example


@dataclass
class EvalResult:
    nll_sum: float = 0.0
    n_correct_tokens: int = 0
    n_tokens: int = 0
    n_examples: int = 0
    n_choice_correct: int = 0
    n_choice_examples: int = 0

    @property
    def loss(self) -> float:
        """Mean NLL per completion token in nats."""
        return self.nll_sum / self.n_tokens if self.n_tokens else math.nan

    @property
    def token_accuracy(self) -> float:
        return self.n_correct_tokens / self.n_tokens if self.n_tokens else math.nan

    @property
    def accuracy(self) -> float | None:
        """Multiple-choice accuracy; None when no example has `choices`."""
        return self.n_choice_correct / self.n_choice_examples if self.n_choice_examples else None

    def __add__(self, other: "EvalResult") -> "EvalResult":
        return EvalResult(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def to_tensor(self) -> torch.Tensor:
        """Float64 so that a distributed all-reduce of the sums stays exact for integer counts."""
        return torch.tensor([getattr(self, f.name) for f in fields(self)], dtype=torch.float64)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> "EvalResult":
        vals = t.tolist()
        return cls(vals[0], *(int(round(v)) for v in vals[1:]))

    def summary(self) -> dict[str, Any]:
        """The flat record written to logs and reports."""
        return {
            "loss": self.loss,
            "token_accuracy": self.token_accuracy,
            "accuracy": self.accuracy,
            "n_examples": self.n_examples,
            "n_tokens": self.n_tokens,
            "n_choice_examples": self.n_choice_examples,
        }


def evaluate(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    batch_tokens: int = 8192,
    chat_template: bool = False,
    device: str | torch.device | None = None,
    pad_id: int | None = None,
) -> EvalResult:
    """Evaluate the model as it is now (a training loop calls this between steps; it restores train mode).

    Loss and token accuracy are over each example's reference completion; multiple-choice accuracy scores every
    choice as the completion (the same tokenization) and picks the highest summed log-likelihood, ARC-Easy style.
    """
    device = device if device is not None else next(model.parameters()).device
    pad_id = pad_token_id(tokenizer, model) if pad_id is None else pad_id
    refs = [encode_example(tokenizer, ex.prompt, ex.completion, chat_template) for ex in examples]
    choice_rows: list[tuple[int, Encoded]] = [
        (i, encode_example(tokenizer, ex.prompt, choice, chat_template))
        for i, ex in enumerate(examples)
        if ex.choices
        for choice in ex.choices
    ]
    was_training = model.training
    model.eval()
    try:
        ref_stats = _row_stats(model, refs, pad_id, device, batch_tokens)
        choice_stats = _row_stats(model, [enc for _, enc in choice_rows], pad_id, device, batch_tokens)
    finally:
        model.train(was_training)
    result = EvalResult(n_examples=len(examples))
    for nll, hits, ntok in ref_stats:
        result.nll_sum += nll
        result.n_correct_tokens += hits
        result.n_tokens += ntok
    best: dict[int, tuple[float, int]] = {}
    next_choice: dict[int, int] = {}
    for (i, _), (nll, _, _) in zip(choice_rows, choice_stats):
        c = next_choice.get(i, 0)
        next_choice[i] = c + 1
        if i not in best or -nll > best[i][0]:
            best[i] = (-nll, c)
    result.n_choice_examples = len(best)
    result.n_choice_correct = sum(1 for i, (_, c) in best.items() if examples[i].answer == c)
    return result


def _row_stats(
    model: Any, rows: Sequence[Encoded], pad_id: int, device: Any, batch_tokens: int
) -> list[tuple[float, int, int]]:
    """(nll_sum, hits, n_tokens) per row, in input order; rows are batched by length to pad little."""
    out: list[tuple[float, int, int]] = [(0.0, 0, 0)] * len(rows)
    order = sorted(range(len(rows)), key=lambda i: len(rows[i].input_ids))
    with torch.no_grad():
        for chunk in chunk_by_tokens(order, lambda i: len(rows[i].input_ids), batch_tokens):
            batch = left_pad([rows[i] for i in chunk], pad_id, device)
            logits = model(**model_inputs(batch)).logits
            nll, hits, ntok = completion_stats(logits, batch)
            for i, a, b, c in zip(chunk, nll.tolist(), hits.tolist(), ntok.tolist()):
                out[i] = (a, int(b), int(c))
    return out


def pad_token_id(tokenizer: Any, model: Any) -> int:
    for candidate in (tokenizer.pad_token_id, getattr(getattr(model, "config", None), "pad_token_id", None)):
        if candidate is not None:
            return int(candidate)
    return int(tokenizer.eos_token_id)


def exact_match_text(generated: str, reference: str, stop: Sequence[str] = ("\n",), eos: str | None = None) -> bool:
    """Does a greedy continuation say exactly the reference? Both sides are stripped of surrounding whitespace
    (the data format gives completions one leading space, and a model may end with a space or newline before its
    EOS), and the continuation is cut at the first `stop` string the reference does not itself contain: what a
    user reads is the first line, not what the model would ramble on with. EOS ends the text: the decode cuts it on
    token ids, and `eos` cuts a textual one (a continuation decoded with its special tokens)."""
    text = generated.split(eos, 1)[0] if eos else generated
    for s in stop:
        if s and s not in reference and s in text:
            text = text.split(s, 1)[0]
    return text.strip() == reference.strip()


@dataclass
class ExactMatch:
    n_correct: int
    n_examples: int
    outputs: list[str]

    @property
    def accuracy(self) -> float:
        return self.n_correct / self.n_examples if self.n_examples else math.nan


def greedy_exact_match(
    model: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    *,
    chat_template: bool = False,
    margin: int = 4,
    batch_size: int = 16,
    stop: Sequence[str] = ("\n",),
) -> ExactMatch:
    """Greedy exact-match accuracy on generation rows: what a user of the finetuned model sees, where teacher-forced
    token accuracy only says how close it came. Each row decodes at most its reference's token count + `margin`
    tokens (a right answer needs no more, and the cap keeps CPU evaluation affordable), stops at EOS, and is
    compared by `exact_match_text`. The prompt is encoded as training encodes it (`encode_prompt`)."""
    from engine.core.data import encode_prompt

    device = next(model.parameters()).device
    pad_id = pad_token_id(tokenizer, model)
    eos = tokenizer.eos_token_id
    prompts = [encode_prompt(tokenizer, ex.prompt, chat_template) for ex in examples]
    budgets = [len(tokenizer(ex.completion, add_special_tokens=False)["input_ids"]) + margin for ex in examples]
    outputs = [""] * len(examples)
    order = sorted(range(len(examples)), key=lambda i: len(prompts[i]))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                width = max(len(prompts[i]) for i in chunk)
                ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
                mask = torch.zeros_like(ids)
                for row, i in enumerate(chunk):
                    ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
                    mask[row, width - len(prompts[i]):] = 1
                new = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                     max_new_tokens=max(budgets[i] for i in chunk), pad_token_id=pad_id,
                                     eos_token_id=eos)[:, width:].tolist()
                for row, i in enumerate(chunk):
                    toks = new[row][:budgets[i]]
                    if eos in toks:
                        toks = toks[:toks.index(eos)]
                    outputs[i] = tokenizer.decode(toks, skip_special_tokens=True)
    finally:
        model.train(was_training)
    hits = sum(exact_match_text(out, ex.completion, stop, tokenizer.eos_token) for out, ex in zip(outputs, examples))
    return ExactMatch(hits, len(examples), outputs)
