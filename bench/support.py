"""README's support table, written from what the tests recorded (bench/results/support.json), never by hand.

Usage: python -m bench.support      (after the tests ran: `make test`, and `.ci/vllm.sh` for the vLLM column)

tests/engine/test_arch_matrix.py, tests/actors/test_vllm_arch.py, tests/engine/test_feature_pool.py,
tests/engine/finetune/test_finetune_variety.py and tests/engine/test_real_model.py record a cell only after its
check against PEFT passed (or after the refusal's exact line was checked). A cell no test recorded reads "not tested".
"""
from __future__ import annotations

import json
from pathlib import Path

from bench.readme import replace_block

SUPPORT_JSON = Path("bench/results/support.json")
README_BLOCK = "support"
ARCH_COLUMNS = ["score (hf)", "score (vllm)", "merge linear", "merge cat", "merge svd", "finetune --init"]
FEATURE_COLUMNS = ["score (hf)", "merge", "finetune --init"]


def _cell(value: str | None) -> str:
    if value is None:
        return "not tested"
    if value == "ok":
        return "✓"
    return value.replace("|", "/")  # "refused: <why>" as the test recorded it


def _table(rows: dict[str, dict[str, str]], columns: list[str], first: str, notes: dict[str, str]) -> list[str]:
    out = [f"| {first} | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for name, cells in rows.items():
        label = f"{name} ({notes[name]})" if notes.get(name) else name
        out.append(f"| {label} | " + " | ".join(_cell(cells.get(c)) for c in columns) + " |")
    return out


def render(data: dict) -> str:
    try:
        from tests.archs import ARCHS

        notes = {name: a.note for name, a in ARCHS.items()}
    except ImportError:  # an installed package without the tests folder
        notes = {}
    lines = ["Architectures (tiny random configs, real PEFT adapters; every ✓ is a check against PEFT):", ""]
    lines += _table(data.get("architectures", {}), ARCH_COLUMNS, "architecture", notes)
    lines += ["", "Adapter features (tiny Llama; ✓ = equal to PEFT, refused = one line naming the feature):", ""]
    lines += _table(data.get("features", {}), FEATURE_COLUMNS, "feature", {})
    return "\n".join(lines)


def main() -> None:
    data = json.loads(SUPPORT_JSON.read_text())
    text = render(data)
    replace_block(README_BLOCK, text)
    print(text)


if __name__ == "__main__":
    main()
