"""Hub-style donors with different target sets in one pool, through the whole scoring job (catalog, validation,
Ray actors, mixed forward passes, the store), each row equal to an independent PEFT forward; and each feature
merged (cat: the exact ΔW) against PEFT's own ΔW, or refused in one line naming the feature."""
from engine.api import merge
import json

import pytest
import torch

import engine
from engine.core.data import encode_sample, load_jsonl
from engine.core.errors import DonorError
from engine.scoring import ScoreConfig, score
from engine.scoring.store import read_scores
from tests.adapters import peft_reference_loss
from tests.adapters import hub_style_donors, peft_deltas
from tests.support.record import record

# what the merge refuses, and the words its one line must carry
MERGE_REFUSES = {"rank/alpha patterns": "rank_pattern gives modules ranks", "lora_bias": "not supported by the merge"}


@pytest.fixture(scope="module")
def hub_style(base_dir, tmp_path_factory):
    return hub_style_donors(base_dir, tmp_path_factory.mktemp("pool-variety"))


def test_one_pool_of_different_target_sets_scores_like_peft(ray_local, base_dir, tokenizer, task_file, hub_style,
                                                            tmp_path):
    manifest = tmp_path / "pool" / "manifest.jsonl"
    manifest.parent.mkdir()
    manifest.write_text("".join(json.dumps({"id": f, "path": str(ours)}) + "\n" for f, (ours, _) in hub_style.items()))
    targets = {f: tuple(sorted(json.loads((ours / "adapter_config.json").read_text())["target_modules"]))
               for f, (ours, _) in hub_style.items()}
    assert len(set(targets.values())) >= 4, targets
    cfg = ScoreConfig(base=str(base_dir), donors=[str(manifest)], data=task_file, out=tmp_path / "scores",
                      samples=8, actors=1, donors_per_call=8, trusted_roots=[hub_style["rsLoRA"][0].parent])
    summary = score(cfg)
    rows = read_scores(cfg.out).set_index("donor")
    assert summary.failed == 0, rows[rows.status != "ok"][["status", "error"]].to_dict()
    from engine.core.data import sample_examples

    sample = encode_sample(tokenizer, sample_examples(load_jsonl(task_file), 8, 0))
    for feature, (_, reference) in hub_style.items():
        want, _ = peft_reference_loss(base_dir, reference, sample)
        tol = 2e-2 if feature == "bf16 donor" else 1e-5
        assert abs(rows.loc[feature, "loss"] - want) < tol, (feature, rows.loc[feature, "loss"], want)
        record("features", feature, "score (hf)", "ok")
    record("features", "different target sets in one pool", "score (hf)", "ok")


@pytest.mark.parametrize("feature", ["rsLoRA", "rank/alpha patterns", "alpha_pattern", "layers_to_transform",
                                     "lora_bias", "adapter-name keys", "bf16 donor"])
def test_each_feature_merges_to_peft_delta_or_is_refused(base_dir, hub_style, tmp_path, feature):
    ours, reference = hub_style[feature]
    other, _ = hub_style["plain (mlp only)"] if feature != "plain (mlp only)" else hub_style["rsLoRA"]
    if feature in MERGE_REFUSES:
        with pytest.raises(DonorError, match=MERGE_REFUSES[feature]) as exc:
            merge([ours, other], method="cat", out=tmp_path / "m")
        assert "\n" not in str(exc.value)
        record("features", feature, "merge", "refused")
        return
    out = merge([ours, other], weights=[0.5, 0.5], method="cat", out=tmp_path / "m")
    want: dict[str, torch.Tensor] = {}
    for folder in (reference, other):
        for module, delta in peft_deltas(base_dir, folder).items():
            want[module] = want.get(module, 0) + 0.5 * delta
    got = peft_deltas(base_dir, out)
    assert got.keys() == want.keys()
    tol = 1e-2 if feature == "bf16 donor" else 1e-5
    for module in want:
        torch.testing.assert_close(got[module].float(), want[module].float(), atol=tol, rtol=tol)
    record("features", feature, "merge", "ok")
    record("features", "plain (mlp only)", "merge", "ok")  # the second donor of every merge here, ΔW checked too
    record("features", "different target sets in one pool", "merge", "ok")  # q/v (+o, +down) with gate/up
