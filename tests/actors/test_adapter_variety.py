"""Adapters as the Hub publishes them, scored by the hf backend against PEFT itself (an independent forward)."""
import json
import shutil

import pytest
import torch

from actors.backends.base import DonorRequest
from actors.backends.hf import HFBackend, HFOptions
from actors.backends.vllm import precheck
from actors.lora_slots import LoraSlots, read_layout
from engine.core.data import encode_sample, load_jsonl
from tests.adapters import peft_reference_loss as reference_loss
from tests.adapters import with_adapter_name_in_keys, write_peft_adapter

QV = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def variety(base_dir, tmp_path_factory):
    """name → (folder we score, folder PEFT's reference loads)."""
    root = tmp_path_factory.mktemp("variety")
    out = {}

    def add(name, **lora):
        path = write_peft_adapter(base_dir, root / name, seed=len(out) + 1, **lora)
        out[name] = (path, path)

    add("rslora_patterns", r=8, lora_alpha=16, target_modules=QV + ["down_proj"], use_rslora=True,
        rank_pattern={"v_proj": 4}, alpha_pattern={"mlp": 32, "q_proj": 5})
    add("layers_to_transform", r=8, lora_alpha=16, target_modules=QV, layers_to_transform=[1])
    add("mlp_only", r=4, lora_alpha=4, target_modules=["gate_proj", "up_proj"])
    add("lora_bias", r=4, lora_alpha=8, target_modules=QV, lora_bias=True)
    plain = out["mlp_only"][0]
    out["adapter_name_keys"] = (with_adapter_name_in_keys(plain, root / "named"), plain)
    bf16 = shutil.copytree(out["rslora_patterns"][0], root / "bf16")
    from safetensors.torch import load_file, save_file

    save_file({k: v.to(torch.bfloat16) for k, v in load_file(str(bf16 / "adapter_model.safetensors")).items()},
              str(bf16 / "adapter_model.safetensors"))
    out["bf16"] = (bf16, bf16)
    return out


@pytest.fixture(scope="module")
def sample(tokenizer, task_file):
    return encode_sample(tokenizer, load_jsonl(task_file)[:8])


def test_every_variant_scores_like_peft_in_one_mixed_pool(base_dir, variety, sample):
    backend = HFBackend(str(base_dir), HFOptions(max_resident=8, batch_tokens=512))
    reqs = [DonorRequest(name, str(ours), i + 1) for i, (name, (ours, _)) in enumerate(variety.items())]
    for req, s in zip(reqs, backend.score(reqs, sample)):
        loss, acc = reference_loss(base_dir, variety[req.donor][1], sample)
        assert s.error is None, (req.donor, s.error)
        tol = 2e-2 if req.donor == "bf16" else 1e-5  # bf16 factors are exact in fp32 slots, PEFT upcasts alike
        assert abs(s.loss - loss) < tol, (req.donor, s.loss, loss)


def test_slots_never_drop_a_module(base_dir, variety):
    from transformers import AutoModelForCausalLM

    layout = read_layout(variety["mlp_only"][0])
    slots = LoraSlots(AutoModelForCausalLM.from_pretrained(str(base_dir)), 2, {"gate_proj"}, 8)
    assert not slots.fits(layout)
    with pytest.raises(RuntimeError, match="do not cover this donor"):
        slots.load("x", variety["mlp_only"][0], layout)


def test_vllm_routes_per_module_scales_away(variety):
    assert "per-module scales" in precheck(variety["rslora_patterns"][0])
    assert precheck(variety["mlp_only"][0]) is None


def test_empty_prompt_without_bos_is_scored_alike_everywhere(base_dir, tokenizer, tmp_path, variety):
    """No BOS and an empty prompt: the first completion token has no context, so it is context, not a target;
    scoring (mixed batch, that row the longest of its chunk) equals the independent PEFT forward."""
    from transformers import AutoTokenizer

    from engine.core.data import Example

    folder = tmp_path / "tok"
    tokenizer.save_pretrained(str(folder))
    spec = json.loads((folder / "tokenizer.json").read_text())
    spec["post_processor"] = None
    (folder / "tokenizer.json").write_text(json.dumps(spec))
    no_bos = AutoTokenizer.from_pretrained(str(folder))
    assert no_bos("")["input_ids"] == []
    examples = [Example("", " alpha beta gamma delta epsilon zeta eta theta"), Example("copy: red ->", " red")]
    sample = encode_sample(no_bos, examples)
    assert sample.examples[0].n_prompt == 1
    backend = HFBackend(str(base_dir), HFOptions(max_resident=4, batch_tokens=512))
    ours = variety["mlp_only"][0]
    [scored] = backend.score([DonorRequest("d", str(ours), 1)], sample)
    loss, _ = reference_loss(base_dir, ours, sample)
    assert scored.error is None and abs(scored.loss - loss) < 1e-5
    assert scored.n_tokens == sum(len(e.input_ids) - 1 for e in sample.examples[:1]) + sample.examples[1].n_completion


def test_base_weights_are_read_from_safetensors_only(base_dir, tmp_path):
    """A base that ships only a pickle (pytorch_model.bin) is refused, never unpickled."""
    from transformers import AutoModelForCausalLM

    folder = tmp_path / "pickled_base"
    shutil.copytree(base_dir, folder)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir))
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    with pytest.raises(OSError, match="safetensors"):
        HFBackend(str(folder), HFOptions())


def test_hub_fetches_no_pickles():
    from engine.core.hub import ADAPTER_FILES, MODEL_FILES

    assert not any("bin" in p or p.endswith((".pt", ".pth", ".ckpt")) for p in ADAPTER_FILES + MODEL_FILES)


@pytest.mark.parametrize("passes", ["mixed", "by_donor"])
@pytest.mark.parametrize("slot_forward", ["segments", "grouped"])
def test_segmented_slots_give_the_rows_peft_mixed_batches_give(base_dir, variety, sample, passes, slot_forward,
                                                               monkeypatch):
    """`lora_forward: segments` (each donor's rows one slice, its delta added by a hook) against PEFT's own
    mixed-batch forward, on the same mixed pool: plain LoRA, rsLoRA with rank and alpha patterns, other target sets,
    a layer subset, bf16 factors; then the same pool beside a donor only PEFT loads (lora_bias), which sends its
    passes to PEFT's path. The spy proves the fast path ran, so the comparison cannot pass vacuously."""
    slot_only = [n for n in variety if n != "lora_bias"]
    calls = []
    original = LoraSlots.segments
    monkeypatch.setattr(LoraSlots, "segments", lambda self, names: (calls.append(len(names)), original(self, names))[1])

    def scores(forward: str) -> list[dict]:
        backend = HFBackend(str(base_dir), HFOptions(max_resident=8, batch_tokens=512, passes=passes,
                                                     lora_forward=forward))
        out = []
        for names in (slot_only, list(variety)):
            reqs = [DonorRequest(name, str(variety[name][0]), i + 1) for i, name in enumerate(names)]
            out.append({s.donor: s for s in backend.score(reqs, sample)})
        return out

    fast = scores(slot_forward)
    used = len(calls)
    slow = scores("peft")
    assert used > 0 and len(calls) == used, "segments ran for slot donors only, and never with lora_forward: peft"
    for fast_call, slow_call in zip(fast, slow):
        for donor, s in fast_call.items():
            ref = slow_call[donor]
            assert s.error is None and ref.error is None, (donor, s.error, ref.error)
            assert abs(s.loss - ref.loss) < 1e-6 and s.n_correct == ref.n_correct and s.n_tokens == ref.n_tokens, donor


def test_grouped_segments_give_the_rows_the_per_donor_loop_gives(base_dir, variety, sample, monkeypatch):
    """A mixed pass of several slot donors over one chunk adds every donor's delta with two batched matmuls per
    layer; against the per-segment loop on the same mixed pool (plain LoRA, rsLoRA with patterns, other target sets,
    a layer subset, bf16 factors). The spy proves the grouped path ran."""
    slot_only = [n for n in variety if n != "lora_bias"]
    reqs = [DonorRequest(name, str(variety[name][0]), i + 1) for i, name in enumerate(slot_only)]
    grouped = []
    original = LoraSlots._add_grouped
    monkeypatch.setattr(LoraSlots, "_add_grouped", lambda self, *a: (grouped.append(1), original(self, *a))[1])

    def scores(forward: str) -> dict:
        backend = HFBackend(str(base_dir), HFOptions(max_resident=8, batch_tokens=512, passes="mixed",
                                                     lora_forward=forward))
        return {s.donor: s for s in backend.score(reqs, sample)}

    fast = scores("grouped")
    used = len(grouped)
    loop = scores("segments")
    assert used > 0 and len(grouped) == used, "the grouped path ran, and only when asked"
    for donor, s in fast.items():
        ref = loop[donor]
        assert s.error is None and ref.error is None, (donor, s.error, ref.error)
        assert abs(s.loss - ref.loss) < 1e-6 and s.n_correct == ref.n_correct and s.n_tokens == ref.n_tokens, donor
