"""Any nested state dict (torch's optimizer and scheduler, DeepSpeed's ZeRO partitions) as one safetensors file and
one JSON tree, so that a saved finetune state loads without unpickling anything.

Tensors go to safetensors (each under its own key); dicts, lists, tuples and plain scalars go to JSON with their
types kept (an optimizer's integer slot keys stay integers, its betas a tuple). A leaf that is neither (DeepSpeed's
LossScaler object) is not saved: it decodes as KEPT, and `fill_kept` takes that value from the live object's own
state dict, which holds the same thing for the float32 and bfloat16 runs mashup trains.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


class _Kept:
    def __repr__(self) -> str:
        return "KEPT"


KEPT = _Kept()


def encode(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The JSON tree of `obj`; its tensors are added to `tensors` (cloned: views of one buffer are saved apart)."""
    if torch.is_tensor(obj):
        key = f"t{len(tensors)}"
        tensors[key] = obj.detach().cpu().clone().contiguous()
        return {"t": key}
    if isinstance(obj, dict):
        return {"d": [[_key(k), encode(v, tensors)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"l" if isinstance(obj, list) else "u": [encode(v, tensors) for v in obj]}
    if isinstance(obj, int) and not isinstance(obj, bool):
        return {"v": int(obj)}  # an IntEnum (DeepSpeed's ZeroStageEnum) as its number
    if obj is None or isinstance(obj, (bool, float, str)):
        return {"v": obj}
    return {"k": type(obj).__name__}


def decode(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    (kind, value), = tree.items()
    if kind == "t":
        return tensors[value]
    if kind == "d":
        return {(int(k[1:]) if k.startswith("i") else k[1:]): decode(v, tensors) for k, v in value}
    if kind == "l":
        return [decode(v, tensors) for v in value]
    if kind == "u":
        return tuple(decode(v, tensors) for v in value)
    if kind == "k":
        return KEPT
    return value


def fill_kept(obj: Any, live: Any) -> Any:
    """`obj` with every KEPT leaf replaced by the value at the same place in `live` (the live object's state)."""
    if obj is KEPT:
        return live
    if isinstance(obj, dict) and isinstance(live, dict):
        return {k: fill_kept(v, live.get(k)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)) and isinstance(live, (list, tuple)) and len(obj) == len(live):
        return type(obj)(fill_kept(v, w) for v, w in zip(obj, live))
    return obj


def write_tree(folder: Path, name: str, obj: Any) -> None:
    """`<folder>/<name>.safetensors` and `<folder>/<name>.json`."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    tree = encode(obj, tensors)
    save_file(tensors, str(folder / f"{name}.safetensors"))
    (folder / f"{name}.json").write_text(json.dumps(tree))


def read_tree(folder: Path, name: str) -> Any:
    from safetensors.torch import load_file

    tree = json.loads((folder / f"{name}.json").read_text())
    return decode(tree, load_file(str(folder / f"{name}.safetensors")))


def _key(k: Any) -> str:
    if isinstance(k, bool) or not isinstance(k, (int, str)):
        raise TypeError(f"state dict key {k!r} is neither an int nor a str")
    return f"i{int(k)}" if isinstance(k, int) else f"s{k}"
