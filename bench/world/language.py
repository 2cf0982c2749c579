"""Natural-language tasks from templates and tables the repo holds: capitals, antonyms, plurals, number words,
simple arithmetic, sentiment of templated sentences.

Each task is a (table, prompt template) pair. Two tasks that share a table with different templates are close
relatives (the answer is the same fact, asked another way); tasks on other tables are unrelated. Rows are seeded,
so the same call always writes the same files. Multiple-choice options are other answers from the same table.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Portugal": "Lisbon",
    "Austria": "Vienna", "Poland": "Warsaw", "Greece": "Athens", "Norway": "Oslo", "Sweden": "Stockholm",
    "Finland": "Helsinki", "Denmark": "Copenhagen", "Ireland": "Dublin", "Hungary": "Budapest", "Egypt": "Cairo",
    "Kenya": "Nairobi", "Japan": "Tokyo", "China": "Beijing", "India": "New Delhi", "Russia": "Moscow",
    "Peru": "Lima", "Chile": "Santiago", "Cuba": "Havana", "Canada": "Ottawa", "Australia": "Canberra",
    "Mexico": "Mexico City", "Argentina": "Buenos Aires", "Colombia": "Bogota", "Turkey": "Ankara", "Iran": "Tehran",
    "Iraq": "Baghdad", "Thailand": "Bangkok", "Vietnam": "Hanoi", "Nigeria": "Abuja", "Ghana": "Accra",
    "Morocco": "Rabat", "Belgium": "Brussels", "Switzerland": "Bern", "Czechia": "Prague", "Romania": "Bucharest",
    "Ukraine": "Kyiv", "Brazil": "Brasilia", "Pakistan": "Islamabad", "Ethiopia": "Addis Ababa", "Senegal": "Dakar",
}
ANTONYMS = {
    "hot": "cold", "big": "small", "fast": "slow", "happy": "sad", "light": "dark", "up": "down", "old": "new",
    "rich": "poor", "early": "late", "open": "closed", "full": "empty", "hard": "soft", "high": "low", "long": "short",
    "strong": "weak", "wet": "dry", "clean": "dirty", "thick": "thin", "loud": "quiet", "near": "far", "heavy": "light",
    "true": "false", "inside": "outside", "first": "last", "good": "bad", "wide": "narrow", "young": "old",
    "deep": "shallow", "cheap": "expensive", "safe": "dangerous", "sharp": "dull", "win": "lose", "push": "pull",
    "buy": "sell", "begin": "end", "love": "hate", "remember": "forget", "accept": "refuse", "arrive": "leave",
}
PLURALS = {
    "cat": "cats", "dog": "dogs", "child": "children", "mouse": "mice", "foot": "feet", "tooth": "teeth",
    "man": "men", "woman": "women", "box": "boxes", "city": "cities", "baby": "babies", "knife": "knives",
    "leaf": "leaves", "wolf": "wolves", "goose": "geese", "bus": "buses", "church": "churches", "potato": "potatoes",
    "hero": "heroes", "sheep": "sheep", "fish": "fish", "person": "people", "glass": "glasses", "story": "stories",
    "wish": "wishes", "life": "lives", "half": "halves", "party": "parties", "house": "houses", "book": "books",
    "tree": "trees", "fox": "foxes", "ox": "oxen", "cactus": "cacti", "crisis": "crises", "day": "days",
    "toy": "toys", "key": "keys", "lady": "ladies", "watch": "watches",
}
_ONES = "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen " \
        "seventeen eighteen nineteen".split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_word(n: int) -> str:
    """0..99 in English words (hyphenated, as style guides write them)."""
    if n < 20:
        return _ONES[n]
    return _TENS[n // 10] + ("" if n % 10 == 0 else "-" + _ONES[n % 10])


NUMBERS = {str(n): number_word(n) for n in range(100)}
SUMS = {f"{a}+{b}": str(a + b) for a in range(2, 30) for b in range(2, 30)}
_SUBJECTS = ("movie", "meal", "hotel", "book", "concert", "service", "trip", "game", "coffee", "phone", "show", "class")
_POS = ("wonderful", "great", "excellent", "delightful", "amazing", "lovely", "fantastic", "superb", "pleasant")
_NEG = ("terrible", "awful", "boring", "horrible", "disappointing", "dreadful", "poor", "annoying", "bad")
SENTIMENT = {f"The {s} was {a}.": ("positive" if a in _POS else "negative") for s in _SUBJECTS for a in _POS + _NEG}

TABLES: dict[str, dict[str, str]] = {
    "capitals": CAPITALS, "antonyms": ANTONYMS, "plurals": PLURALS, "numbers": NUMBERS, "sums": SUMS,
    "sentiment": SENTIMENT,
}


def _sum_q(template: str):
    return lambda key: template.format(*key.split("+"))


@dataclass(frozen=True)
class LangTask:
    name: str
    table: str
    template: str  # "{}" is the table key; sums use "{0}" and "{1}"
    invert: bool = False  # ask for the key given the value (the table must be one-to-one)

    def pairs(self) -> list[tuple[str, str]]:
        items = sorted(TABLES[self.table].items())
        return [(v, k) for k, v in items] if self.invert else items

    def prompt(self, key: str) -> str:
        return _sum_q(self.template)(key) if self.table == "sums" else self.template.format(key)


TASKS: dict[str, LangTask] = {t.name: t for t in [
    LangTask("capital-of", "capitals", "What is the capital of {}? Answer with the city only."),
    LangTask("capital-city-name", "capitals", "Name the capital city of {}."),
    LangTask("country-of-capital", "capitals", "{} is the capital of which country? Answer with the country only.",
             invert=True),
    LangTask("antonym", "antonyms", "What is the opposite of the word '{}'? Answer with one word."),
    LangTask("plural", "plurals", "What is the plural of the word '{}'? Answer with one word."),
    LangTask("number-words", "numbers", "Write the number {} in words."),
    LangTask("sum", "sums", "What is {0} plus {1}? Answer with the number only."),
    LangTask("sentiment", "sentiment", "Is this review positive or negative? \"{}\" Answer with one word."),
]}


def split_keys(task: LangTask, seed: int = 0, held_out: float = 0.5) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """Train pairs and held-out pairs (evaluation asks about keys the training rows never showed)."""
    pairs = task.pairs()
    rng = random.Random(f"{task.table}/{seed}")  # by table: relatives hold out the same facts
    order = list(range(len(pairs)))
    rng.shuffle(order)
    cut = int(len(pairs) * (1 - held_out))
    return [pairs[i] for i in sorted(order[:cut])], [pairs[i] for i in sorted(order[cut:])]


def rows(task: LangTask, pairs: list[tuple[str, str]], n: int, seed: int, choices: int = 0) -> list[dict]:
    """`n` rows drawn from `pairs` (with replacement when n exceeds them); with `choices`, the wrong options are
    other answers of the same table, so the options always look like plausible answers."""
    rng = random.Random(f"{task.name}/{seed}")
    answers = sorted({a for _, a in task.pairs()})
    out = []
    for i in range(n):
        key, answer = pairs[i % len(pairs)] if n <= len(pairs) else rng.choice(pairs)
        row = {"prompt": task.prompt(key), "completion": answer}
        if choices:
            wrong = rng.sample([a for a in answers if a != answer], min(choices - 1, len(answers) - 1))
            opts = [answer, *wrong]
            rng.shuffle(opts)
            row.update(choices=opts, answer=opts.index(answer))
        out.append(row)
    if n <= len(pairs):
        rng.shuffle(out)
    return out
