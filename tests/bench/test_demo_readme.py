"""README's demo block is written from runs/demo/results.json by `python -m bench.demo_readme` (run by `make demo`)."""
from __future__ import annotations

import json

from bench.demo_readme import main, render

RESULTS = {
    "metric": "accuracy",
    "rows": [
        {"arm": "mashup", "seeds": 2, "rank": 8, "alpha": 16, "trainable_params": 1234567, "step0": 0.26, "final": 0.7651,
         "final_std": 0.0642, "heldout_metric": "accuracy", "heldout": 0.5, "heldout_std": 0.01, "parity_step": 24,
         "parity_pct": 40.0},
        {"arm": "scratch", "seeds": 2, "rank": 8, "alpha": 16, "trainable_params": 1234567, "step0": 0.22,
         "final": 0.265, "final_std": 0.0, "heldout_metric": "accuracy", "heldout": 0.2, "heldout_std": 0.04,
         "parity_step": None, "parity_pct": None},
    ],
    "selections": {"mashup": {"strategy": "top-k", "metric": "loss", "weighting": "uniform", "base_loss": 3.1,
                              "donors": [{"donor": "a", "loss": 2.378, "token_accuracy": 0.41, "weight": 0.5},
                                         {"donor": "b", "loss": 2.397, "token_accuracy": None, "weight": 0.5}]}},
}


def test_block_rows_come_from_results_json():
    text = render(RESULTS, {"score": 10.0, "finetune": 5.0})
    assert "15 s of stages" in text
    assert "| mashup | 8 / 16 (1,234,567) | 0.260 | 0.765 ± 0.064 | 0.500 ± 0.010 | 24 (40 %) |" in text
    assert "| scratch | 8 / 16 (1,234,567) | 0.220 | 0.265 ± 0.000 | 0.200 ± 0.040 | never |" in text
    assert ("`mashup` selected (top-k by loss, uniform): `a` (loss 2.378, token accuracy 0.410), "
            "`b` (loss 2.397, token accuracy —); base model loss 3.100.") in text


def test_main_rewrites_only_the_block(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps(RESULTS))
    readme = tmp_path / "README.md"
    readme.write_text("before\n<!-- demo:start -->\nold numbers 0.515\n<!-- demo:end -->\nafter\n")
    main(["--run", str(run), "--readme", str(readme)])
    text = readme.read_text()
    assert text.startswith("before\n<!-- demo:start -->\nMeasured ") and text.endswith("<!-- demo:end -->\nafter\n")
    assert "0.515" not in text and "0.765 ± 0.064" in text
