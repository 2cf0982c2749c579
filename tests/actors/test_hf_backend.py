"""The hf backend against an independent computation: one PeftModel.from_pretrained per donor, plain forward."""
import pytest
import torch

from actors.backends.base import BASE_REQUEST, DonorRequest
from actors.backends.hf import HFBackend, HFOptions
from engine.core.data import encode_sample, load_jsonl
from tests.adapters import peft_reference_loss as reference_loss


@pytest.fixture(scope="module")
def sample(tokenizer, task_file):
    return encode_sample(tokenizer, load_jsonl(task_file))


@pytest.fixture(scope="module")
def requests(pool_dir):
    folders = sorted(pool_dir.glob("*/*"))
    return [DonorRequest(f.relative_to(pool_dir).as_posix(), str(f), i + 1) for i, f in enumerate(folders)]


@pytest.fixture(scope="module")
def backend(base_dir):
    return HFBackend(str(base_dir), HFOptions(max_resident=8, batch_tokens=512))


def test_mixed_batch_matches_independent_peft(backend, base_dir, sample, requests):
    scores = backend.score([BASE_REQUEST, *requests], sample)
    losses = [s.loss for s in scores]
    assert len(set(round(x, 4) for x in losses)) == len(losses), "donors should differ from each other and the base"
    for req, s in zip([None, *requests], scores):
        loss, acc = reference_loss(base_dir, req.path if req else None, sample)
        assert s.error is None
        assert abs(s.loss - loss) < 1e-5, (s.donor, s.loss, loss)
        assert abs(s.token_accuracy - acc) < 1e-9
        assert s.n_tokens == sample.n_tokens and s.n_examples == len(sample.examples)


def test_donor_grouped_passes_match_independent_peft(base_dir, sample, requests, monkeypatch):
    """A sample of at least batch_tokens tokens per donor runs one active adapter per forward pass (no
    adapter_names: PEFT's mixed path syncs the GPU per adapter and layer); the scores are the same."""
    backend = HFBackend(str(base_dir), HFOptions(max_resident=8, batch_tokens=64))
    assert sum(len(e.input_ids) for e in sample.examples) >= 64
    scores = backend.score([BASE_REQUEST, *requests], sample)
    for req, s in zip([None, *requests], scores):
        loss, acc = reference_loss(base_dir, req.path if req else None, sample)
        assert s.error is None
        assert abs(s.loss - loss) < 1e-5, (s.donor, s.loss, loss)
        assert abs(s.token_accuracy - acc) < 1e-9

    calls = []
    original = type(backend.peft).set_adapter

    def spy(self, name, *args, **kwargs):
        calls.append(name)
        return original(self, name, *args, **kwargs)

    monkeypatch.setattr(type(backend.peft), "set_adapter", spy)
    again = backend.score(requests[:2], sample)
    assert calls == [], "segmented slots switch no adapter (PEFT's set_adapter walks every module)"
    assert [a.loss for a in again] == pytest.approx([s.loss for s in scores[1:3]], abs=1e-6)
    peft_path = HFBackend(str(base_dir), HFOptions(max_resident=8, batch_tokens=64, lora_forward="peft"))
    peft_path.score(requests[:2], sample)
    calls.clear()
    again = peft_path.score(requests[:2], sample)
    assert calls == [peft_path._forward_name[peft_path.adapter_name(r)] for r in requests[:2]], "one switch per donor"
    assert [a.loss for a in again] == pytest.approx([s.loss for s in scores[1:3]], abs=1e-6)


def test_bf16_slots_hold_the_model_dtype(base_dir, sample, requests):
    """In bf16 the slots are bf16 too (PEFT would keep float32 adapters and upcast every LoRA input)."""
    backend = HFBackend(str(base_dir), HFOptions(dtype="bfloat16", max_resident=4))
    scores = backend.score(requests[:2], sample)
    assert {p.dtype for n, p in backend.peft.named_parameters() if "lora_" in n} == {torch.bfloat16}
    for req, s in zip(requests[:2], scores):
        loss, _ = reference_loss(base_dir, req.path, sample)
        assert s.error is None and abs(s.loss - loss) < 5e-2, (s.donor, s.loss, loss)


@pytest.mark.parametrize("passes, batch_tokens", [("mixed", 64), ("by_donor", 512), ("auto", 512)])
def test_pass_layout_option_matches_independent_peft(base_dir, sample, requests, passes, batch_tokens):
    """`passes` forces the layout the `auto` rule would not pick at this batch_tokens (64: auto runs one donor per
    pass; 512: auto mixes donors); the layout changes, the scores do not."""
    backend = HFBackend(str(base_dir), HFOptions(max_resident=8, batch_tokens=batch_tokens, passes=passes))
    reqs = [BASE_REQUEST, *requests]
    donors_per_pass = {len({req.donor for _, _, req in chunk}) for chunk in backend._chunks(reqs, sample)}
    assert (max(donors_per_pass) == 1) == (passes == "by_donor"), donors_per_pass
    for req, s in zip([None, *requests], backend.score(reqs, sample)):
        loss, acc = reference_loss(base_dir, req.path if req else None, sample)
        assert s.error is None
        assert abs(s.loss - loss) < 1e-5, (passes, s.donor, s.loss, loss)
        assert abs(s.token_accuracy - acc) < 1e-9


@pytest.mark.parametrize("dtype, tol", [("float32", 1e-5), ("bfloat16", 5e-2)])
def test_float32_slot_option_keeps_peft_float32_adapters(base_dir, sample, requests, dtype, tol):
    """`slot_dtype="float32"` keeps PEFT's float32 adapters whatever the model's dtype (the pre-cast behaviour)."""
    backend = HFBackend(str(base_dir), HFOptions(dtype=dtype, max_resident=4, slot_dtype="float32"))
    scores = backend.score(requests[:2], sample)
    assert {p.dtype for n, p in backend.peft.named_parameters() if "lora_" in n} == {torch.float32}
    for req, s in zip(requests[:2], scores):
        loss, _ = reference_loss(base_dir, req.path, sample)
        assert s.error is None and abs(s.loss - loss) < tol, (s.donor, s.loss, loss)


def test_mixed_batch_equals_one_donor_at_a_time(base_dir, sample, requests):
    mixed = HFBackend(str(base_dir), HFOptions(max_resident=8, batch_tokens=512)).score(requests, sample)
    alone = HFBackend(str(base_dir), HFOptions(max_resident=2, mixed_batch=False))
    for req, m in zip(requests, mixed):
        [s] = alone.score([req], sample)
        assert abs(s.loss - m.loss) < 1e-5 and s.n_correct == m.n_correct


def test_lru_evicts_and_reloads_without_changing_results(base_dir, sample, requests):
    small = HFBackend(str(base_dir), HFOptions(max_resident=2))
    first = [small.score([r], sample)[0].loss for r in requests]
    assert len(small.resident()) == 2 and small.lru.evictions == len(requests) - 2
    again = small.score([requests[0]], sample)[0].loss
    assert abs(again - first[0]) < 1e-6


def test_a_donor_that_fails_to_load_does_not_fail_its_batch(backend, sample, requests, tmp_path):
    broken = DonorRequest("broken", str(tmp_path / "missing"), 99)
    scores = backend.score([requests[0], broken], sample)
    assert scores[0].error is None
    assert scores[1].error.startswith("adapter failed to load")


def test_slots_equal_peft_load_adapter(base_dir, sample, requests):
    slots = HFBackend(str(base_dir), HFOptions(max_resident=8)).score(requests, sample)
    plain = HFBackend(str(base_dir), HFOptions(max_resident=8, slots=False)).score(requests, sample)
    for a, b in zip(slots, plain):
        assert abs(a.loss - b.loss) < 1e-6 and a.n_correct == b.n_correct


def test_slot_layout_grows_and_odd_donors_fall_back_to_peft(base_dir, sample, requests, tmp_path):
    from bench.world.tiny import write_lora_adapter

    emb = write_lora_adapter(base_dir, tmp_path / "emb", seed=11, r=4, target_modules=("embed_tokens", "q_proj"),
                             init_std=0.2)
    wide = write_lora_adapter(base_dir, tmp_path / "wide", seed=12, r=16, alpha=8,
                              target_modules=("gate_proj", "up_proj", "down_proj"), init_std=0.2)
    backend = HFBackend(str(base_dir), HFOptions(max_resident=8))
    reqs = [requests[0], DonorRequest("emb", str(emb), 50), DonorRequest("wide", str(wide), 51), requests[1]]
    scores = backend.score(reqs, sample)
    assert backend.slots.rank == 16 and {"gate_proj", "q_proj", "v_proj"} <= backend.slots.targets
    assert backend._forward_name[backend.adapter_name(reqs[1])] == "d50", "embedding LoRA should use PEFT's loader"
    for req, s in zip(reqs, scores):
        loss, _ = reference_loss(base_dir, req.path, sample)
        assert s.error is None and abs(s.loss - loss) < 1e-5, (req.donor, s.loss, loss)
