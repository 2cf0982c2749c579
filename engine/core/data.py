"""Task data: JSONL loading, deterministic sampling and tokenization with a completion-only loss mask.

The tokenization rule is a contract (docs/contracts.md, "Task data") shared by scoring, finetuning and
evaluation, so all of them call `encode_example` and nothing else.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from engine.core.errors import DataError


@dataclass(frozen=True)
class Example:
    prompt: str
    completion: str
    choices: tuple[str, ...] | None = None
    answer: int | None = None


@dataclass(frozen=True)
class Encoded:
    """Token ids of prompt+completion+EOS; loss positions are input_ids[n_prompt:]."""

    input_ids: tuple[int, ...]
    n_prompt: int

    @property
    def n_completion(self) -> int:
        return len(self.input_ids) - self.n_prompt


@dataclass
class EncodedSample:
    """A scored sample: what actors receive. `fingerprint` identifies it for resume."""

    examples: list[Encoded]
    fingerprint: str = field(default="")
    base_fingerprint: str = field(default="")  # what the base was when the sample id was made (engine.core.identity)

    @property
    def n_tokens(self) -> int:
        return sum(e.n_completion for e in self.examples)


def iter_jsonl(path: Path, error: type[Exception] = DataError) -> Iterator[tuple[str, Any]]:
    """(`file:line`, parsed row) for each non-blank line; a bad line raises `error` naming file and line."""
    with path.open(encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield f"{path}:{lineno}", json.loads(line)
            except json.JSONDecodeError as exc:
                raise error(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None


def load_jsonl(path: str | Path) -> list[Example]:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file not found: {p}")
    out = [_parse_row(row, where) for where, row in iter_jsonl(p)]
    if not out:
        raise DataError(f"{p}: no examples (the file is empty)")
    return out


def _parse_row(row: Any, where: str) -> Example:
    if not isinstance(row, dict):
        raise DataError(f"{where}: each line must be a JSON object")
    for key in ("prompt", "completion"):
        if not isinstance(row.get(key), str):
            raise DataError(f"{where}: field {key!r} must be a string")
    if not row["completion"]:
        raise DataError(f"{where}: empty completion (there is nothing to score)")
    choices, answer = row.get("choices"), row.get("answer")
    if choices is not None:
        if not (isinstance(choices, list) and choices and all(isinstance(c, str) and c for c in choices)):
            raise DataError(f"{where}: 'choices' must be a non-empty list of non-empty strings")
        if not (isinstance(answer, int) and 0 <= answer < len(choices)):
            raise DataError(f"{where}: 'answer' must be an index into 'choices'")
        choices = tuple(choices)
    return Example(row["prompt"], row["completion"], choices, answer)


def sample_examples(examples: Sequence[Example], n: int | None, seed: int = 0) -> list[Example]:
    """A seeded subset, kept in file order so the same file and seed always give the same sample."""
    if n is None or n >= len(examples):
        return list(examples)
    idx = sorted(random.Random(seed).sample(range(len(examples)), n))
    return [examples[i] for i in idx]


def encode_prompt(tokenizer: Any, prompt: str, chat_template: bool = False) -> list[int]:
    if chat_template:
        return list(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=False
            )
        )
    return list(tokenizer(prompt, add_special_tokens=True)["input_ids"])


def encode_example(tokenizer: Any, prompt: str, completion: str, chat_template: bool = False) -> Encoded:
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token; the completion-loss contract needs one")
    p = encode_prompt(tokenizer, prompt, chat_template)
    c = list(tokenizer(completion, add_special_tokens=False)["input_ids"]) + [tokenizer.eos_token_id]
    # An empty prompt with a tokenizer that adds no BOS leaves nothing to predict the first completion token from:
    # it becomes the context and is not scored (nor trained on), in every backend alike (docs/contracts.md).
    return Encoded(tuple(p + c), max(len(p), 1))


def encode_sample(
    tokenizer: Any,
    examples: Sequence[Example],
    max_length: int | None = None,
    chat_template: bool = False,
    source: str = "data",
    salt: str = "",
) -> EncodedSample:
    """Encode and check every example before any expensive work starts; `salt` joins the fingerprint (e.g. the base id)."""
    encoded = []
    for i, ex in enumerate(examples):
        enc = encode_example(tokenizer, ex.prompt, ex.completion, chat_template)
        if max_length is not None and len(enc.input_ids) > max_length:
            raise DataError(
                f"{source}: example {i} is {len(enc.input_ids)} tokens, longer than the model context ({max_length})"
            )
        encoded.append(enc)
    h = hashlib.sha256(salt.encode())
    for e in encoded:
        h.update(json.dumps([e.n_prompt, e.input_ids]).encode())
    return EncodedSample(encoded, h.hexdigest()[:16])
