"""transformers + PEFT backend: one resident base, an LRU of adapters in LoRA slots, mixed-adapter batches.

Small samples: each forward pass mixes rows of several donors (PEFT `adapter_names`), examples sorted by length.
Samples with at least `batch_tokens` tokens per donor already fill whole forward passes on their own, so rows are
grouped by donor and each pass runs one active adapter: PEFT's mixed-batch path indexes every LoRA layer's input
with a Python list per adapter (a host-to-device copy, hence a device sync, per adapter and layer): on an H100
one donor per pass scored 1.7x faster (docs/gpu.md). Loading a donor copies its tensors into a pre-injected slot
(`actors.lora_slots`) instead of rewriting the model; donors that slots do not model (embedding LoRAs,
`modules_to_save`, `lm_head` targets) fall back to PEFT's own `load_adapter`.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import replace
from typing import ClassVar, Literal

import torch
from pydantic import Field

from actors.adapter_cache import AdapterLRU
from actors.lora_slots import LoraSlots, read_layout
from actors.backends.base import BASE, Backend, BackendOptions, DonorRequest, DonorScore, short_error
from engine.core.device import resolve_device, resolve_dtype
from engine.core.losses import chunk_by_tokens, completion_head, completion_stats, left_pad, model_inputs
from engine.core.data import EncodedSample


class HFOptions(BackendOptions):
    SPEED_ONLY: ClassVar[frozenset[str]] = BackendOptions.SPEED_ONLY | {"mixed_batch", "slots", "passes",
                                                                           "lora_forward"}

    mixed_batch: bool = Field(True, description="put several donors in one forward pass")
    slots: bool = Field(True, description="load donors by copying into pre-injected LoRA slots")
    passes: Literal["auto", "mixed", "by_donor"] = Field(
        "auto",
        description="how rows fill forward passes: 'auto' runs one donor per pass when a donor's sample fills "
        "batch_tokens, else mixes donors; 'mixed' always mixes donors (rows length-sorted over all donors); "
        "'by_donor' always runs one donor per pass. Scores are the same; only speed differs (docs/gpu.md)",
    )
    lora_forward: Literal["grouped", "segments", "peft"] = Field(
        "grouped",
        description="how a pass of slot donors adds their LoRA deltas: 'segments' groups each donor's rows and adds "
        "its delta to that slice (actors.lora_slots); 'grouped' does the same, with every donor's delta in two "
        "batched matmuls per layer when the donors' slices are equal (mixed passes); 'peft' uses PEFT's mixed-batch "
        "forward (adapter_names). Scores are the same; passes that hold a donor PEFT loaded itself always use PEFT's",
    )
    slot_dtype: Literal["model", "float32"] = Field(
        "model",
        description="dtype of the LoRA slots: 'model' casts them to the model's dtype (faster in bf16); 'float32' "
        "keeps PEFT's float32 adapters, as PEFT's own loader does",
    )


class HFBackend(Backend):
    name = "hf"
    Options = HFOptions

    def __init__(self, base: str, options: HFOptions):
        from transformers import AutoModelForCausalLM

        super().__init__(base, options)
        self.device = resolve_device(options.device)
        self.dtype = resolve_dtype(options.dtype, self.device)
        self.model = AutoModelForCausalLM.from_pretrained(
            base, dtype=self.dtype, trust_remote_code=options.trust_remote_code, use_safetensors=True
        ).to(self.device)
        self.model.eval()
        self.pad_id = self.model.config.pad_token_id or 0
        self.peft = None
        self.slots: LoraSlots | None = None
        self._forward_name: dict[str, str] = {}
        self._paths: dict[str, DonorRequest] = {}
        self.lru: AdapterLRU[str] = AdapterLRU(options.max_resident, self._load, self._unload)
        self.layouts: dict = {}  # parsed safetensors headers, shared by donors of one shape (bounded by open_adapter)

    @staticmethod
    def adapter_name(req: DonorRequest) -> str:
        return BASE if req.is_base else f"d{req.int_id}"

    def _load(self, name: str) -> None:
        from peft import PeftModel

        req = self._paths[name]
        path = req.path
        layout = read_layout(path, self.layouts) if self.options.slots else None
        if layout is not None and any(m.split(".")[-1] == "lm_head" for m in layout.modules):
            layout = None
        if layout is not None and (self.slots is None or not self.slots.fits(layout)):
            self._rebuild_slots(layout)
        if layout is not None and self.slots.fits(layout):  # a module the slots still lack: PEFT loads it whole
            self._forward_name[name] = self.slots.load(name, path, layout, req.tensors)
        elif self.peft is None:
            self.peft = PeftModel.from_pretrained(self.model, path, adapter_name=name, is_trainable=False)
            self.peft.eval()
            self._forward_name[name] = name
        else:
            self.peft.load_adapter(path, adapter_name=name, is_trainable=False)
            self._forward_name[name] = name

    def _rebuild_slots(self, layout) -> None:
        """Grow the slot layout to cover `layout`; every resident donor is reloaded into the new slots."""
        targets, rank = layout.suffixes, layout.max_rank
        if self.slots is not None:
            targets, rank = targets | self.slots.targets, max(rank, self.slots.rank)
        base = self.peft.unload() if self.peft is not None else self.model
        self.slots = LoraSlots(base, self.options.max_resident, targets, rank,
                               group=self.options.lora_forward == "grouped")
        self._cast_slots()
        self.peft = self.slots.peft
        self._forward_name.clear()
        for key in self.lru.keys():
            self._load(key)

    def _cast_slots(self) -> None:
        """Slots in the model's dtype. PEFT keeps adapters in float32 (`autocast_adapter_dtype`), so in bf16 every
        LoRA layer would upcast its input and add a float32 delta: bf16 slots scored 1.2x faster on an H100
        (docs/gpu.md). Donor tensors are rounded to the model's dtype when copied in, as vLLM does."""
        if self.dtype == torch.float32 or self.options.slot_dtype == "float32":
            return
        for layer in self.slots.layers.values():
            for name in self.slots.names:
                layer.lora_A[name].to(self.dtype)
                layer.lora_B[name].to(self.dtype)

    def _unload(self, name: str) -> None:
        self._forward_name.pop(name, None)
        if self.slots is not None and name in self.slots.owner:
            self.slots.release(name)
        elif self.peft is not None and name in self.peft.peft_config and len(self.peft.peft_config) > 1:
            if name in self.peft.active_adapters:
                self.peft.set_adapter(next(a for a in self.peft.peft_config if a != name))
            self.peft.delete_adapter(name)

    def resident(self) -> list[str]:
        return [self._paths[n].donor for n in self.lru.keys()]

    def score(self, donors: list[DonorRequest], sample: EncodedSample) -> list[DonorScore]:
        results: dict[str, DonorScore] = {}
        loadable = []
        for req in donors:
            try:
                self._ensure([req])
                loadable.append(req)
            except Exception as exc:  # noqa: BLE001 - a donor's failure must not fail its batch
                results[req.donor] = DonorScore(req.donor, error=f"adapter failed to load: {short_error(exc)}")
        groups = [loadable] if self.options.mixed_batch else [[r] for r in loadable]
        for group in groups:
            try:
                results.update(self._score_group(group, sample))
            except Exception:  # noqa: BLE001 - isolate the culprit by rescoring one donor at a time
                for req in group:
                    try:
                        results.update(self._score_group([req], sample))
                    except Exception as exc:  # noqa: BLE001
                        results[req.donor] = DonorScore(req.donor, error=f"forward failed: {short_error(exc)}")
        return [results[r.donor] for r in donors]

    def _ensure(self, reqs: list[DonorRequest]) -> None:
        names = [self.adapter_name(r) for r in reqs if not r.is_base]
        for r in reqs:
            self._paths[self.adapter_name(r)] = r
        self.lru.ensure(names)
        for r in reqs:  # loaded: the weights the scorer read are no longer needed (a reload reads the file)
            if r.tensors is not None:
                self._paths[self.adapter_name(r)] = replace(r, tensors=None)

    def _chunks(self, group: list[DonorRequest], sample: EncodedSample):
        """Forward passes as lists of (length, example index, request): one donor per pass when each donor's rows
        fill at least one pass (or `passes="by_donor"`), else several donors per pass over the same examples (or
        `passes="mixed"`); length-sorted either way, so padding stays small."""
        budget, passes = self.options.batch_tokens, self.options.passes
        fills = sum(len(ex.input_ids) for ex in sample.examples) >= budget
        if passes == "by_donor" or (passes == "auto" and fills):
            order = sorted((len(ex.input_ids), i) for i, ex in enumerate(sample.examples))
            for req in group:
                yield from chunk_by_tokens([(n, i, req) for n, i in order], lambda row: row[0], budget)
            return
        # Several donors per pass, each with the same examples: every pass holds equal, back-to-back segments, one
        # per donor, which the LoRA slots add in one batched matmul per layer (LoraSlots._add_grouped). As many
        # donors share a pass as the longest example allows; their examples are chunked by the budget's share.
        order = sorted((len(ex.input_ids), i) for i, ex in enumerate(sample.examples))
        per_pass = max(1, min(len(group), budget // max(1, order[-1][0])))
        ranked = sorted(group, key=lambda req: req.int_id)
        for k in range(0, len(ranked), per_pass):
            donors = ranked[k:k + per_pass]
            for chunk in chunk_by_tokens(order, lambda row: row[0], max(1, budget // len(donors))):
                yield [(n, i, req) for req in donors for n, i in chunk]

    @torch.inference_mode()
    def _score_group(self, group: list[DonorRequest], sample: EncodedSample) -> dict[str, DonorScore]:
        if not group:
            return {}
        t0 = time.perf_counter()
        self._ensure(group)
        acc = {req.donor: DonorScore(req.donor, n_examples=len(sample.examples)) for req in group}
        for chunk in self._chunks(group, sample):
            batch = left_pad([sample.examples[i] for _, i, _ in chunk], self.pad_id, self.device)
            inputs = model_inputs(batch)
            names = [self._forward_name.get(self.adapter_name(req), BASE) for _, _, req in chunk]
            head = self.model.get_output_embeddings()
            gather = completion_head(self.model, batch) if isinstance(head, torch.nn.Linear) else _nothing()
            segments = self.slots is not None and self.options.lora_forward != "peft" and all(
                n == BASE or self.slots.is_slot(n) for n in names)
            if self.slots is not None and not segments:
                self.slots.peft_mode()
            with gather:
                if self.peft is None:
                    if any(n != BASE for n in names):
                        raise RuntimeError("adapter rows without a loaded adapter")
                    logits = self.model(**inputs).logits
                elif segments:
                    with self.slots.segments([None if n == BASE else n for n in names]):
                        logits = self.peft(**inputs).logits
                elif names[0] != BASE and names.count(names[0]) == len(names):
                    if self.peft.active_adapter != names[0]:
                        self.peft.set_adapter(names[0], inference_mode=True)
                    logits = self.peft(**inputs).logits
                else:
                    logits = self.peft(**inputs, adapter_names=names).logits
            nll, hits, ntok = completion_stats(logits, batch)
            for (_, i, req), a, b, c in zip(chunk, nll.tolist(), hits.tolist(), ntok.tolist()):
                acc[req.donor].add_example(a, b, c, i)
        seconds = (time.perf_counter() - t0) / len(group)
        out = {}
        for req in group:
            score = acc[req.donor]
            score.seconds = seconds
            if not torch.isfinite(torch.tensor(score.loss)):
                score.error = f"non-finite loss ({score.loss}); the adapter's weights are likely corrupt"
            out[req.donor] = score
        return out


@contextlib.contextmanager
def _nothing():
    yield

