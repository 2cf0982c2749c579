"""Synthetic string tasks in families of graded relatedness.

A task is a base operation (reverse, sort, rotate, …) followed by a post-edit (identity, drop the first
character, …). Two tasks with the same base operation are close variants: their answers share most tokens. Tasks
with different base operations are distant, and the digit tasks are unrelated to all string tasks. Each task has
its own random tag in the prompt, so a target's tag is never seen by a donor.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

LETTERS = "abcdefghijklmnop"
DIGITS = "0123456789"


def _shift(s: str) -> str:
    return "".join(LETTERS[(LETTERS.index(c) + 3) % len(LETTERS)] for c in s)


BASE_OPS: dict[str, Callable[[str], str]] = {
    "rev": lambda s: s[::-1],
    "sort": lambda s: "".join(sorted(s)),
    "rotl": lambda s: s[2:] + s[:2],
    "evens": lambda s: s[::2],
    "shift": _shift,
}
POST_OPS: dict[str, Callable[[str], str]] = {
    "id": lambda s: s,
    "dropf": lambda s: s[1:],
    "swap": lambda s: s[-1] + s[1:-1] + s[0] if len(s) > 1 else s,
    "dbl": lambda s: s + s[-1],
}
NUM_OPS: dict[str, Callable[[str], str]] = {
    "sum": lambda s: str(sum(map(int, s)) % 10),
    "max": lambda s: max(s),
    "min": lambda s: min(s),
    "count": lambda s: str(len(s)),
    "first2": lambda s: s[:2],
    "revnum": lambda s: s[::-1],
}


@dataclass(frozen=True)
class Task:
    name: str
    family: str
    tag: str
    fn: Callable[[str], str]
    alphabet: str

    def example(self, rng: random.Random) -> tuple[str, str, str]:
        x = "".join(rng.choice(self.alphabet) for _ in range(rng.randint(5, 9)))
        return x, f"{self.tag} : {' '.join(x)} =", " " + " ".join(self.fn(x))


def _tag(name: str) -> str:
    rng = random.Random(name)
    return "".join(rng.choice("QRSTUVWXYZ") for _ in range(3))


def all_tasks() -> dict[str, Task]:
    tasks = {}
    for b, bf in BASE_OPS.items():
        for p, pf in POST_OPS.items():
            name = f"{b}+{p}"
            tasks[name] = Task(name, b, _tag(name), (lambda bf, pf: lambda s: pf(bf(s)))(bf, pf), LETTERS)
    for n, nf in NUM_OPS.items():
        name = f"num+{n}"
        tasks[name] = Task(name, "num", _tag(name), nf, DIGITS)
    return tasks


def _near_misses(answer: str, alphabet: str, rng: random.Random) -> list[str]:
    """Same-length wrong answers a model that half-knows the task would confuse: a swap and a substitution."""
    out = []
    if len(answer) > 1:
        i = rng.randrange(len(answer) - 1)
        out.append(answer[:i] + answer[i + 1] + answer[i] + answer[i + 2:])
    j = rng.randrange(len(answer))
    out.append(answer[:j] + rng.choice([c for c in alphabet if c != answer[j]]) + answer[j + 1:])
    return out


def rows(task: Task, n: int, seed: int, choices: int = 0, siblings: list[Task] | None = None) -> list[dict]:
    """`n` examples; with `choices`, wrong options have the answer's length (a sibling task's answer, an adjacent
    swap, a one-character substitution), so length alone never gives the answer away."""
    rng = random.Random(f"{task.name}/{seed}")
    out = []
    for _ in range(n):
        x, prompt, completion = task.example(rng)
        row = {"prompt": prompt, "completion": completion}
        if choices:
            answer = task.fn(x)
            sib = [s.fn(x) for s in siblings or [] if len(s.fn(x)) == len(answer)]
            pool = sib[:1] + _near_misses(answer, task.alphabet, rng) + sib[1:]
            wrong = [w for w in dict.fromkeys(pool) if w != answer]
            while len(wrong) < choices - 1:  # random strings of the answer's length from the task's alphabet
                fake = "".join(rng.choice(task.alphabet) for _ in answer)
                if fake != answer and fake not in wrong:
                    wrong.append(fake)
            opts = [completion, *(" " + " ".join(w) for w in wrong[: choices - 1])]
            rng.shuffle(opts)
            row.update(choices=opts, answer=opts.index(completion))
        out.append(row)
    return out


def pretraining_lines(n: int, seed: int = 0) -> list[str]:
    """Format and copying with random tags and no task operation: the base learns the shape, not the tasks."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        alphabet = LETTERS if rng.random() < 0.8 else DIGITS
        x = "".join(rng.choice(alphabet) for _ in range(rng.randint(3, 9)))
        tag = "".join(rng.choice("QRSTUVWXYZ") for _ in range(3))
        lines.append(f"{tag} : {' '.join(x)} = {' '.join(x)}")
    return lines


def siblings(task: Task, tasks: dict[str, Task], k: int = 3) -> list[Task]:
    """Distractor sources: tasks with the same post-edit (answers of the same length) first, then the same family."""
    post = task.name.split("+")[1]
    same_post = [t for t in tasks.values() if t.name.endswith("+" + post) and t.name != task.name]
    family = [t for t in tasks.values() if t.family == task.family and t.name != task.name and t not in same_post]
    return (same_post + family)[:k]
