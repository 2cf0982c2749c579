"""Does a donor fit the base? Checked from files alone, before PEFT touches them, so every reason is specific.

The base is described by a `BaseSpec` built on the meta device (no weights read), so validation costs a JSON
parse and a safetensors header read per donor, plus an optional finiteness pass over the adapter's tensors.
"""
from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.catalog import ADAPTER_CONFIG, inside
from engine.errors import DonorError

WEIGHTS = "adapter_model.safetensors"
MAX_HEADER = 100 * 2**20
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
               "F8_E4M3": 1, "F8_E5M2": 1}
KEY_RE = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+?)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)"
                    r"(?:\.[^.]+)?(?:\.weight)?$")
FORBIDDEN_CONFIG_KEYS = ("trust_remote_code", "auto_map", "custom_code")


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
    modules = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            modules[name] = (mod.in_features, mod.out_features)
        elif isinstance(mod, torch.nn.Embedding):
            modules[name] = (mod.num_embeddings, mod.embedding_dim)
    return BaseSpec(getattr(config, "_name_or_path", "") or base, modules)


def read_header(path: Path) -> dict[str, Any]:
    """Parse a safetensors header ourselves, so a hostile header (huge length, bad offsets) fails before any read."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise ValueError("file too short to be safetensors")
        (n,) = struct.unpack("<Q", raw)
        if n > min(MAX_HEADER, size - 8):
            raise ValueError(f"header claims {n} bytes but the file has {size - 8}")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError("header is not valid JSON") from None
    data_len = size - 8 - n
    for key, info in header.items():
        if key == "__metadata__":
            continue
        shape, dtype, (start, end) = info["shape"], info["dtype"], info["data_offsets"]
        count = math.prod(shape)
        if dtype not in DTYPE_BYTES or end - start != count * DTYPE_BYTES[dtype] or not 0 <= start <= end <= data_len:
            raise ValueError(f"tensor {key!r} ({dtype} {shape}) does not fit the file (offsets {start}..{end}, data {data_len} bytes)")
    return header


def _load_config(folder: Path, donor: str) -> dict[str, Any]:
    cfg_path = folder / ADAPTER_CONFIG
    if not cfg_path.is_file():
        raise DonorError(donor, f"missing {ADAPTER_CONFIG}")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise DonorError(donor, f"corrupt {ADAPTER_CONFIG} (not JSON)") from None
    if not isinstance(cfg, dict):
        raise DonorError(donor, f"corrupt {ADAPTER_CONFIG} (not an object)")
    return cfg


def _check_config(cfg: dict[str, Any], donor: str) -> None:
    if cfg.get("peft_type") != "LORA":
        raise DonorError(donor, f"unsupported adapter type {cfg.get('peft_type')!r} (only LoRA)")
    for key in FORBIDDEN_CONFIG_KEYS:
        if cfg.get(key):
            raise DonorError(donor, f"adapter config asks for custom code ({key}); refusing to load it")
    if cfg.get("use_dora"):
        raise DonorError(donor, "DoRA adapters are not supported (their magnitude vectors do not merge as LoRA)")


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
) -> dict[str, Any]:
    """Raise `DonorError` with the specific reason, or return the adapter config."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DonorError(donor, f"adapter folder not found: {folder}")
    cfg = _load_config(folder, donor)
    _check_config(cfg, donor)
    weights = folder / WEIGHTS
    if not weights.is_file():
        if (folder / "adapter_model.bin").exists():
            raise DonorError(donor, "only a pickle weight file (adapter_model.bin); refusing to unpickle, convert it to safetensors")
        raise DonorError(donor, f"missing {WEIGHTS}")
    if root is not None:
        for f in (folder / ADAPTER_CONFIG, weights):
            if not inside(root, f):
                raise DonorError(donor, f"{f.name} resolves outside the pool root {root} (symlink?)")
    base_name = cfg.get("base_model_name_or_path") or ""
    if strict_base_name and base_name and not _names_match(base_name, spec.name):
        raise DonorError(donor, f"trained on a different base model ({base_name!r}, expected {spec.name!r})")
    try:
        header = read_header(weights)
    except (ValueError, KeyError, TypeError, OSError) as exc:
        raise DonorError(donor, f"corrupt {WEIGHTS}: {exc}") from None
    _check_shapes(donor, cfg, header, spec, base_name)
    if check_finite:
        _check_finite(donor, weights)
    return cfg


def _check_shapes(donor: str, cfg: dict, header: dict, spec: BaseSpec, base_name: str) -> None:
    hint = f" (adapter trained on {base_name!r}; wrong base?)" if base_name else ""
    ranks: dict[str, int] = {}
    n_lora = 0
    for key, info in header.items():
        m = KEY_RE.match(key) if key != "__metadata__" else None
        if not m:
            continue
        n_lora += 1
        module, kind, shape = m["module"], m["kind"], info["shape"]
        if module not in spec.modules:
            raise DonorError(donor, f"target module {module!r} does not exist in the base model{hint}")
        fan_in, fan_out = spec.modules[module]
        if len(shape) != 2:
            raise DonorError(donor, f"{key}: expected a 2-D tensor, got shape {shape}")
        if kind in ("lora_A", "lora_embedding_A"):
            r, dim, want = shape[0], shape[1], fan_in
        else:
            dim, r, want = shape[0], shape[1], fan_out
        if dim != want:
            raise DonorError(donor, f"shape mismatch at {module}.{kind}: {shape} does not fit the base's {want}{hint}")
        if ranks.setdefault(module, r) != r:
            raise DonorError(donor, f"rank mismatch at {module}: lora_A has rank {ranks[module]}, lora_B has {r}")
    if n_lora == 0:
        raise DonorError(donor, f"{WEIGHTS} holds no LoRA tensors")
    declared = cfg.get("r")
    patterns = cfg.get("rank_pattern") or {}
    for module, r in ranks.items():
        expected = next((v for k, v in patterns.items() if re.search(k, module)), declared)
        if expected is not None and r != expected:
            raise DonorError(donor, f"rank mismatch at {module}: tensors have rank {r}, adapter_config says r={expected}")
    _check_targets(donor, cfg, spec, hint)


def _check_targets(donor: str, cfg: dict, spec: BaseSpec, hint: str) -> None:
    targets = cfg.get("target_modules")
    if isinstance(targets, list):
        suffixes = {name.split(".")[-1] for name in spec.modules} | set(spec.modules)
        missing = [t for t in targets if t not in suffixes and not any(n.endswith("." + t) for n in spec.modules)]
        if missing:
            raise DonorError(donor, f"target_modules {missing} not found in the base model{hint}")


def _check_finite(donor: str, weights: Path) -> None:
    import torch
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as f:
        for key in f.keys():
            t = f.get_tensor(key)
            if t.is_floating_point() and not torch.isfinite(t).all():
                raise DonorError(donor, f"non-finite weights (NaN/Inf) in {key}")
