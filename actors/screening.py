"""First-order screening: one backward pass of the base on the sample predicts every donor's loss.

With Gₘ = ∂L/∂Wₘ of the base's token-weighted completion loss L, a donor that adds sₘ·Bₘ·Aₘ to module m has
    L(donor) ≈ L(base) + Σₘ sₘ·⟨Gₘ, Bₘ·Aₘ⟩ = L(base) + Σₘ sₘ·⟨Gₘ·Aₘᵀ, Bₘ⟩,
which costs one (out × in) · (in × r) product per module (about one token through the LoRA) and never forms B·A.
The alignment is cos(−G, ΔW) over the donor's modules, with ‖sBA‖² = s²·⟨BᵀB, AAᵀ⟩ (r × r, also without B·A).

The gradient is computed once per (base, sample) and kept: one copy of every target-module weight (all linear
layers but the LM head), about 14 GB for a 7B model in bf16. A donor the gradient cannot see (an embedding LoRA,
an `lm_head` target, `modules_to_save`, a LoRA bias, DoRA, any module that is not a plain linear layer of the
base) gets an `unscreenable` row with the reason, and the driver scores it exactly: never a silent guess.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from engine.core.losses import chunk_by_tokens, completion_head, left_pad, model_inputs
from actors.scorer import DonorScorer, ScoreTask, result_row
from actors.backends.base import DonorScore
from engine.core.adapter import Adapter, open_adapter
from engine.core.data import EncodedSample
from engine.core.errors import DonorError
from engine.core.scores import BASE_ROW as BASE, SCREEN, set_fields

UNSCREENABLE = "unscreenable"  # a screen row's status: the donor goes to exact scoring


@dataclass
class Prediction:
    loss: float  # L(base) + Σ sₘ⟨Gₘ, BₘAₘ⟩
    alignment: float  # cos(−G, ΔW) over the donor's modules
    dot: float  # Σ sₘ⟨Gₘ, BₘAₘ⟩


class BaseGradient:
    """The base's completion loss and its gradient w.r.t. every linear weight (not the LM head), on one sample."""

    def __init__(self, model: torch.nn.Module, sample: EncodedSample, batch_tokens: int = 8192):
        t0 = time.perf_counter()
        head = model.get_output_embeddings()
        linears = {name: mod for name, mod in model.named_modules()
                   if type(mod) is torch.nn.Linear and mod is not head}
        params = list(model.parameters())
        was = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(False)
        weights = {name: mod.weight for name, mod in linears.items()}
        for w in weights.values():
            w.requires_grad_(True)
            w.grad = None
        pad = model.config.pad_token_id or 0
        device = next(model.parameters()).device
        total = sample.n_tokens
        nll_sum = 0.0
        order = sorted(range(len(sample.examples)), key=lambda i: len(sample.examples[i].input_ids))
        try:
            with torch.enable_grad():
                for chunk in chunk_by_tokens(order, lambda i: len(sample.examples[i].input_ids), batch_tokens):
                    batch = left_pad([sample.examples[i] for i in chunk], pad, device)
                    gather = completion_head(model, batch) if isinstance(head, torch.nn.Linear) else None
                    if gather is not None:
                        with gather:
                            logits = model(**model_inputs(batch)).logits
                    else:
                        logits = model(**model_inputs(batch)).logits[:, -batch.keep:][batch.predict_mask]
                    targets = batch.input_ids[:, -batch.keep:].roll(-1, dims=1)[batch.predict_mask]
                    nll = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="sum")
                    (nll / total).backward()
                    nll_sum += float(nll.detach())
            self.grads = {name: w.grad.detach() for name, w in weights.items()}
        finally:
            for w in weights.values():
                w.grad = None
            for p, flag in zip(params, was):
                p.requires_grad_(flag)
        self.loss = nll_sum / total
        self.n_tokens, self.n_examples = total, len(sample.examples)
        self.grad_sq = {name: float(g.float().pow(2).sum()) for name, g in self.grads.items()}
        self.seconds = time.perf_counter() - t0

    def unscreenable(self, adapter: Adapter) -> str | None:
        """Why the gradient cannot see this donor, or None when every part of it is a linear layer's ΔW."""
        embedding = next((m.module for m in adapter.modules.values() if m.embedding), None)
        if embedding:
            return f"embedding LoRA at {embedding}: outside the linear weights' gradient"
        if adapter.config.extras():
            return f"{', '.join(adapter.config.extras())}: outside the linear weights' gradient"
        if adapter.extra_keys:
            return f"tensors besides LoRA factors ({adapter.extra_keys[0]}…): outside the linear weights' gradient"
        for m in adapter.modules.values():
            if m.module not in self.grads:
                return f"module {m.module} is not a screened linear layer of the base (lm_head or other)"
        return None

    def predict(self, adapter: Adapter) -> Prediction:
        """The first-order loss and the alignment of one plain adapter; reads its factors, never forms B·A."""
        from safetensors import safe_open

        dot, dw_sq, g_sq = 0.0, 0.0, 0.0
        with safe_open(str(adapter.weights), framework="pt") as f:
            for m in adapter.modules.values():
                g = self.grads[m.module]
                a = f.get_tensor(m.a_key).to(g.device, torch.float32)
                b = f.get_tensor(m.b_key).to(g.device, torch.float32)
                if g.shape != (b.shape[0], a.shape[1]):
                    raise DonorError(adapter.name, f"{m.module}: ΔW {b.shape[0]}x{a.shape[1]} does not fit the "
                                                   f"base weight {tuple(g.shape)}")
                ga = g.float() @ a.T  # one module's gradient in float32 at a time, whatever the model's dtype
                dot += m.scale * float((ga.double() * b.double()).sum())
                dw_sq += m.scale ** 2 * float(((b.T.double() @ b.double()) * (a.double() @ a.T.double())).sum())
                g_sq += self.grad_sq[m.module]
        norm = math.sqrt(dw_sq * g_sq)
        return Prediction(self.loss + dot, -dot / norm if norm > 0 else 0.0, dot)


class ScreeningScorer(DonorScorer):
    """A scoring actor that can also screen: `screen()` keeps the base's gradient per sample and reuses it for
    every donor it is sent, and `score()` (inherited) scores exactly, so one pool of actors serves every stage."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.gradient: BaseGradient | None = None
        self.gradient_key: tuple[str, str] | None = None
        self.prepared: dict[tuple, tuple] = {}

    def _prepare(self, task: ScoreTask, fetched):
        """Validation and the content fingerprint, done once per donor and actor while its files are unchanged
        (same stat signature): the screen, the probe and the exact stage of one job would otherwise each redo it,
        and for a screen that costs milliseconds they dominate."""
        from engine.core.adapter import stat_signature

        entry = task.entry
        key = (entry.donor, entry.path, task.int_id, None if entry.is_hub else stat_signature(entry.path))
        if entry.is_hub or key[-1] is None or key not in self.prepared:
            result = super()._prepare(task, fetched)
            if not entry.is_hub and key[-1] is not None:
                self.prepared[key] = (result, self.identity[entry.donor])
            return result
        result, identity = self.prepared[key]
        self.identity[entry.donor] = identity
        return result

    def _gradient(self, sample: EncodedSample) -> BaseGradient:
        key = (sample.base_fingerprint, sample.fingerprint)
        if self.gradient_key != key:
            self.gradient = None  # free the last sample's gradient first
            model = getattr(self.backend, "model", None)
            if model is None or getattr(self.backend, "peft", None) is not None:  # vLLM, or slots injected
                from transformers import AutoModelForCausalLM

                from engine.core.device import resolve_device, resolve_dtype

                device = resolve_device(self.options.device)
                model = AutoModelForCausalLM.from_pretrained(
                    self.base, dtype=resolve_dtype(self.options.dtype, device), use_safetensors=True,
                    trust_remote_code=self.options.trust_remote_code).to(device).eval()
            self.gradient = BaseGradient(model, sample, self.options.batch_tokens)
            self.gradient_key = key
        return self.gradient

    def screen(self, tasks: list[ScoreTask | None], sample: EncodedSample) -> list[dict[str, Any]]:
        """One screen row per task (kind `screen`): predicted loss and alignment, or `unscreenable`/`failed`."""
        from engine.core.hub import fetch_all

        grad = self._gradient(sample)
        fetched = fetch_all([t.entry.path for t in tasks if t and t.entry.is_hub and not t.entry.error],
                            self.fetch_workers)
        self.identity = {}
        out = []
        for task in tasks:
            t0 = time.perf_counter()
            if task is None:
                row = result_row(None, DonorScore(BASE, grad.loss * grad.n_tokens, 0, grad.n_tokens, grad.n_examples))
                set_fields(row, token_accuracy=math.nan, alignment=0.0, kind=SCREEN)
                out.append(row | {"placement": {**self.where, "source": "path"}})
                continue
            try:
                request, scored = self._prepare(task, fetched)
                t0 = time.perf_counter()  # `seconds`: the screen's own cost, as an exact row's is the forward's
                adapter = open_adapter(task.entry.donor, request.path)
                reason = grad.unscreenable(adapter)
                if reason is not None:
                    row = set_fields(result_row(scored, DonorScore(task.entry.donor, error=reason)), status=UNSCREENABLE)
                else:
                    p = grad.predict(adapter)
                    row = result_row(scored, DonorScore(task.entry.donor, p.loss * grad.n_tokens, 0, grad.n_tokens,
                                                        grad.n_examples))
                    set_fields(row, token_accuracy=math.nan, alignment=p.alignment)
            except DonorError as exc:
                row = result_row(task, DonorScore(task.entry.donor, error=exc.reason))
            except Exception as exc:  # noqa: BLE001 - one donor's bad tensors must not fail its batch
                row = result_row(task, DonorScore(task.entry.donor, error=f"screen failed: {type(exc).__name__}: {exc}"))
            set_fields(row, **self.identity.get(task.entry.donor, {}), seconds=time.perf_counter() - t0, kind=SCREEN)
            row["placement"] = {**self.where, "source": "hub" if task.entry.is_hub else "path"}
            out.append(row)
        return out
