"""Does a donor fit the base? Checked from files alone, before PEFT touches them, so every reason is specific.

The base is described by a `BaseSpec` built on the meta device (no weights read), so validation costs a JSON
parse and a safetensors header read per donor, plus an optional finiteness pass over the adapter's tensors.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.core.adapter import CONFIG_FILE, DORA_UNSUPPORTED, WEIGHTS_FILE, Adapter, open_adapter, weights_path
from engine.core.errors import DonorError


@dataclass(frozen=True)
class BaseSpec:
    name: str
    modules: dict[str, tuple[int, int]]  # module path → (in_features, out_features); embeddings: (num, dim)


def base_spec(base: str, trust_remote_code: bool = False) -> BaseSpec:
    """Module shapes of the base from its config alone (meta device: no memory, no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    from transformers.pytorch_utils import Conv1D

    modules = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            modules[name] = (mod.in_features, mod.out_features)
        elif isinstance(mod, Conv1D):  # GPT-2 style: weight is (in, out); PEFT's factors still have A (r, in)
            modules[name] = (mod.weight.shape[0], mod.weight.shape[1])
        elif isinstance(mod, torch.nn.Embedding):
            modules[name] = (mod.num_embeddings, mod.embedding_dim)
    return BaseSpec(getattr(config, "_name_or_path", "") or base, modules)


def _names_match(a: str, b: str) -> bool:
    def norm(s: str) -> str:
        s = s.removeprefix("hf://").rstrip("/")
        m = re.search(r"models--([^/]+)--([^/]+)", s)
        return (f"{m.group(1)}/{m.group(2)}" if m else s).split("/")[-1].lower()

    return norm(a) == norm(b)


def validate_donor(
    donor: str,
    folder: str | Path,
    spec: BaseSpec,
    root: str | None = None,
    strict_base_name: bool = False,
    check_finite: bool = True,
    layouts: dict | None = None,
) -> dict[str, Any]:
    """Raise `DonorError` with the specific reason, or return the adapter config. `layouts` caches parsed headers
    across donors (engine.core.adapter.open_adapter)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DonorError(donor, f"adapter folder not found: {folder}")
    weights_path(donor, folder)  # a pickle-only donor is named as such before its config is even read
    if root is not None:
        # resolved once each (a resolve stats every component of the path): a file that is no symlink resolves
        # to the resolved folder plus its name
        root_r, folder_r = Path(root).resolve(), folder.resolve()
        for f in (folder / CONFIG_FILE, folder / WEIGHTS_FILE):
            if f.exists() and not (f.resolve() if f.is_symlink() else folder_r / f.name).is_relative_to(root_r):
                raise DonorError(donor, f"{f.name} resolves outside the pool root {root} (symlink?)")
    adapter = open_adapter(donor, folder, layouts)
    if adapter.config.raw.get("use_dora"):
        raise DonorError(donor, DORA_UNSUPPORTED)
    base_name = adapter.config.base_model or ""
    if strict_base_name and base_name and not _names_match(base_name, spec.name):
        raise DonorError(donor, f"trained on a different base model ({base_name!r}, expected {spec.name!r})")
    _check_shapes(adapter, spec, base_name)
    if check_finite:
        check_finite_weights(donor, adapter.weights)
    return adapter.config.raw


def _check_shapes(adapter: Adapter, spec: BaseSpec, base_name: str) -> None:
    donor = adapter.name
    hint = f" (adapter trained on {base_name!r}; wrong base?)" if base_name else ""
    for module, f in adapter.modules.items():
        if module not in spec.modules:
            raise DonorError(donor, f"target module {module!r} does not exist in the base model{hint}")
        fan_in, fan_out = spec.modules[module]
        if len(f.a_shape) != 2 or len(f.b_shape) != 2:
            raise DonorError(donor, f"{f.a_key}: expected 2-D tensors, got {list(f.a_shape)} / {list(f.b_shape)}")
        if f.a_shape[1] != fan_in:
            raise DonorError(donor, f"shape mismatch at {module}.lora_A: {list(f.a_shape)} does not fit the base's "
                                    f"{fan_in}{hint}")
        if f.b_shape[0] != fan_out:
            raise DonorError(donor, f"shape mismatch at {module}.lora_B: {list(f.b_shape)} does not fit the base's "
                                    f"{fan_out}{hint}")
    _check_targets(donor, adapter.config.raw, spec, hint)


def _check_targets(donor: str, cfg: dict, spec: BaseSpec, hint: str) -> None:
    targets = cfg.get("target_modules")
    if isinstance(targets, list):
        suffixes = {name.split(".")[-1] for name in spec.modules} | set(spec.modules)
        missing = [t for t in targets if t not in suffixes and not any(n.endswith("." + t) for n in spec.modules)]
        if missing:
            raise DonorError(donor, f"target_modules {missing} not found in the base model{hint}")


def check_finite_weights(donor: str, weights: Path, tensors: dict | None = None, flat=None) -> None:
    """No NaN or Inf in the donor's floating-point tensors; `tensors` already read (engine.core.weights.read_weights)
    are checked in one pass, else the file is read tensor by tensor. `flat`: every tensor's elements as one view
    (`LoadedWeights.flat`), checked in one kernel; a tensor that fails is then named by the per-tensor checks."""
    import torch
    from safetensors import safe_open

    # A NaN or an Inf propagates into a sum, so a finite sum means finite weights: one reduction, no mask. A sum
    # that overflows falls through to the checks below, which decide; float8 (1-byte) factors always go there.
    if flat is not None and flat.is_floating_point() and flat.element_size() > 1:
        acc = flat.sum(dtype=torch.float64 if flat.dtype == torch.float64 else torch.float32)
        if bool(torch.isfinite(acc)):
            return
    if tensors is not None:
        # one fused norm per donor: NaN and Inf propagate into a norm; only a non-finite norm (which finite weights
        # too large to square could also give) is looked into tensor by tensor
        floats = [t for t in tensors.values() if t.is_floating_point()]
        if not floats or torch.isfinite(torch.stack([n.float() for n in torch._foreach_norm(floats)])).all():
            return
        if all(torch.isfinite(t).all() for t in floats):
            return
        bad = next(k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all())
        raise DonorError(donor, f"non-finite weights (NaN/Inf) in {bad}")
    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            t = f.get_tensor(key)
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise DonorError(donor, f"non-finite weights (NaN/Inf) in {key}")
