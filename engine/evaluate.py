"""Held-out evaluation of a causal LM (plain or PEFT): completion-token loss, token accuracy, multiple-choice accuracy.

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
