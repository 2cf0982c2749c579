"""The merge driver: donors in the outer loop, one file open at a time, one float32 state per module.

Modules are processed in groups whose float32 state fits `accumulator_mb`; for LoRA adapters one group usually
holds every module, so each donor file is opened once per pass. Memory is therefore bounded by the state of
one group (about one adapter in float32), whatever the number of donors.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
from pathlib import Path
from typing import Sequence

import torch
from tqdm.auto import tqdm

from engine.core.adapter import CONFIG_FILE as ADAPTER_CONFIG, combine_fingerprint, sha256_file
from engine.core.errors import ConfigError, DonorError, MashupError
from engine.core.identity import key_of
from engine.core.version import __version__
from engine.merge.base import DonorModule, MergeMethod, MergeOptions, ModuleSpec
from engine.merge.config import MergeConfig
from engine.merge.donors import (
    CONFIG_FILE, LAYER_SELECTORS, WEIGHT_FILE, Donor, check_equal_ranks, merged_target_modules, read_donor,
    union_modules, warn_on_base_mismatch, output_dtype,
)
from engine.merge.io import (
    DonorReads, SafetensorsStreamWriter, atomic_output_dir, write_json,
)
from engine.merge.refactor import lora_scale, refactor_module
from engine.merge.registry import get_method

log = logging.getLogger(__name__)

MERGE_INFO_FILE = "merge_info.json"
PROGRESS_MIN_READS = 50


def locate_donor(name: str, path: str) -> Path:
    """A local folder as given (relative to the working directory, as the catalog records it), or the cached
    snapshot of an `hf://org/name[@revision]` donor."""
    if not path.startswith("hf://"):
        return Path(path)
    from engine.core.hub import fetch

    try:
        return Path(fetch(path))
    except Exception as exc:  # noqa: BLE001 - network and cache errors belong to this donor
        raise DonorError(name, f"could not fetch {path}: {type(exc).__name__}: {exc}") from None


def resolve_donors(config: MergeConfig) -> tuple[list[str], list[Path], list[float], list[str | None]]:
    """(names, folders, weights summing to 1, the fingerprints that were scored or None) from a selection.json or
    from --donors/--weights."""
    if config.selection is not None:
        from engine.core.selection_file import Selection

        selection = Selection.read(config.selection)
        names, paths, weights, scored = [], [], [], []
        for entry in selection.donors:
            if not entry.path:
                raise ConfigError(f"selection: donor {entry.donor!r} has no path; pass --donors instead")
            names.append(entry.donor)
            paths.append(locate_donor(entry.donor, entry.path))
            weights.append(entry.weight)
            scored.append(entry.fingerprint)
    elif config.donors:
        names = list(config.donors)
        paths = [locate_donor(d, d) for d in config.donors]
        weights = list(config.weights) if config.weights is not None else [1.0] * len(names)
        scored = [None] * len(names)
    else:
        raise ConfigError("donors: give --selection FILE.json or --donors DIR [DIR ...]")
    if not names:
        raise ConfigError("donors: the selection is empty")
    total = sum(weights)
    if not total > 0 or any(not math.isfinite(w) or w < 0 for w in weights):
        raise ConfigError("weights: must be finite, >= 0, and not all zero")
    if abs(total - 1) > 1e-6:
        log.info("weights sum to %.6g; normalizing to 1", total)
    return names, paths, [w / total for w in weights], scored


def merge_key(config: MergeConfig, names: Sequence[str], weights: Sequence[float],
              fingerprints: Sequence[str | None]) -> str:
    """What a merged adapter is a function of: the method, every option that changes the result, and each
    donor's name, weight and content. `mashup run` redoes a merge whose key moved (engine.core.identity)."""
    options = config.model_dump(mode="json", exclude={"selection", "donors", "weights", "out", "overwrite", "progress",
                                                      "accumulator_mb"})
    return key_of({"options": options, "donors": [[n, round(w, 12), f] for n, w, f in zip(names, weights, fingerprints)]})


def verify_scored(names: Sequence[str], paths: Sequence[Path], scored: Sequence[str | None],
                  weight_digests: Sequence[str]) -> list[str]:
    """Each donor's content fingerprint; a donor whose files changed since they were scored is refused: a
    merge must read the files that the selection ranked."""
    fingerprints = []
    for name, path, want, weights_sha in zip(names, paths, scored, weight_digests):
        got = combine_fingerprint(sha256_file(path / ADAPTER_CONFIG), weights_sha)
        if want is not None and got != want:
            raise DonorError(name, f"{path} changed since it was scored (content fingerprint {got[:12]}, scored "
                                   f"{want[:12]}); rerun `mashup score` (it rescores changed donors), then select")
        fingerprints.append(got)
    return fingerprints


def group_modules(modules: Sequence[ModuleSpec], method: MergeMethod, rank: int,
                  budget_bytes: int) -> list[list[ModuleSpec]]:
    """Consecutive modules whose merge state fits the budget together (a lone oversized module is its own group)."""
    groups: list[list[ModuleSpec]] = [[]]
    used = 0
    for module in modules:
        need = method.state_bytes(module, rank)
        if groups[-1] and used + need > budget_bytes:
            groups.append([])
            used = 0
        groups[-1].append(module)
        used += need
    return groups


def merged_adapter_config(donors: Sequence[Donor], method: MergeMethod, options: MergeOptions, rank: int,
                          modules: Sequence[ModuleSpec]) -> dict:
    """The first donor's config with the merged rank and scale, its modules named explicitly, no layer selectors.

    A method that keeps the donors' scale gets a lora_alpha whose alpha/r (alpha/√r with rsLoRA) is that scale:
    the donors' alpha_pattern is dropped with the other selectors, so a pattern that gives every module the same
    scale, other than lora_alpha/r, must move into lora_alpha or PEFT would load the merge at the wrong scale.
    """
    config = {k: v for k, v in donors[0].config.items() if k not in LAYER_SELECTORS}
    config.update(target_modules=merged_target_modules(donors, modules), inference_mode=True)
    if not method.keeps_donor_scale(options):
        config.update(r=rank, lora_alpha=rank, use_rslora=False)
        return config
    scale = shared_scale(donors)
    if scale is None:
        raise MashupError(f"merge {method.name}: keeps the donors' scale, but they do not share one")
    if not math.isclose(lora_scale(config), scale, rel_tol=1e-12):
        config["lora_alpha"] = scale * (math.sqrt(config["r"]) if config.get("use_rslora") else config["r"])
    return config


def shared_scale(donors: Sequence[Donor]) -> float | None:
    """The one scale (PEFT's per module: alpha_pattern and rsLoRA included) of every module of every donor, when
    they all have the same rank: the merged adapter can then keep it. None otherwise (different alphas or ranks,
    rsLoRA mixes, an alpha_pattern that gives modules different scales): the scales are folded into B."""
    scales = {f.scale for d in donors for f in d.modules.values()}
    if len(scales) != 1 or len({d.rank for d in donors}) != 1:
        return None
    return scales.pop()


def stream_modules(donors: Sequence[Donor], weights: Sequence[float], method: MergeMethod, options: MergeOptions,
                   groups: Sequence[Sequence[ModuleSpec]], rank: int, writer: SafetensorsStreamWriter,
                   progress: bool, reads: DonorReads, refactor: tuple[float, int, float] | None = None) -> None:
    """The hot loop: per group, per pass, per donor (one open file), per module: `method.add`.

    `refactor` = (the method's output scale, rank, alpha): each finished module is re-factored before it is written.
    """
    total = len(groups) * method.passes * len(donors)
    with tqdm(total=total, disable=not progress, unit="donor", desc=f"merge {method.name}", dynamic_ncols=True) as bar:
        for group in groups:
            states = {module.name: method.begin(module, rank, options) for module in group}
            for pass_index in range(method.passes):
                for index, donor in enumerate(donors):
                    present = [(m.name, donor.modules[m.name]) for m in group if m.name in donor.modules]
                    with reads.open(donor.name, donor.weight_file) as read:
                        tensors = read([key for _, keys in present for key in (keys.a_key, keys.b_key)])
                    method.add_donor(
                        [states[name] for name, _ in present],
                        [DonorModule(index, weights[index], keys.scale, a, b)
                         for (_, keys), a, b in zip(present, tensors[::2], tensors[1::2])],
                        pass_index,
                    )
                    bar.update()
            finished = []
            for module in group:
                lora_A, lora_B = method.finish(states.pop(module.name))
                if refactor is not None:
                    lora_A, lora_B = refactor_module(module.name, lora_A, lora_B, *refactor)
                finished.append((module, lora_A, lora_B))
            check_finite(finished)
            for module, lora_A, lora_B in finished:
                writer.write(module.a_key, lora_A)
                writer.write(module.b_key, lora_B)


def check_finite(finished: Sequence[tuple[ModuleSpec, torch.Tensor, torch.Tensor]]) -> None:
    """Refuse a merged group with NaN/Inf, naming the first such module. One fused norm over the whole group (NaN
    and Inf propagate into a norm); only a non-finite norm, which finite factors too large to square could also
    give, is checked module by module."""
    norms = torch._foreach_norm([t.float() for _, a, b in finished for t in (a, b)])
    if torch.isfinite(torch.stack(norms)).all():
        return
    for module, lora_A, lora_B in finished:
        if not (torch.isfinite(lora_A).all() and torch.isfinite(lora_B).all()):
            raise MashupError(f"merged module {module.name} is not finite: a donor holds NaN/Inf weights")


def merge_is_current(config: MergeConfig) -> bool:
    """The adapter at `config.out` was merged from what `config.selection` asks for now: its key (method, every
    option, each donor's name, weight and scored content) equals merge_key of the selection's donors."""
    from engine.core.selection_file import Selection

    if config.out is None or config.selection is None:
        return False
    info = Path(config.out) / MERGE_INFO_FILE
    if not (info.exists() and Path(config.selection).exists()):
        return False
    chosen = Selection.read(config.selection).donors
    if any(d.fingerprint is None for d in chosen):
        return False  # scores without content fingerprints: merge again rather than trust the old one
    want = merge_key(config, [d.donor for d in chosen], [d.weight for d in chosen], [d.fingerprint for d in chosen])
    return json.loads(info.read_text()).get("key") == want


def merge_with_config(config: MergeConfig) -> Path:
    """Config-driven merge shared by the CLI, the Python API and `mashup run`; returns the adapter folder."""
    if config.out is None:
        raise ConfigError("out: required (the folder for the merged adapter)")
    names, paths, weights, scored = resolve_donors(config)
    layouts: dict = {}
    donors = [read_donor(name, path, layouts) for name, path in zip(names, paths)]
    method = get_method(config.method)
    if method.equal_ranks:
        check_equal_ranks(donors, method.name)
    warn_on_base_mismatch(donors)
    options = MergeOptions(
        density=config.density, majority_sign=config.majority_sign or "total", seed=config.seed,
        svd_rank=config.svd_rank, donor_ranks=tuple(d.rank for d in donors),
        shared_scale=shared_scale(donors) is not None,
    )
    rank = method.output_rank(options)
    dtype = output_dtype(donors, config.dtype)
    modules = union_modules(donors)
    groups = group_modules(modules, method, rank, int(config.accumulator_mb * 2**20))
    out_rank = config.refactor_rank or rank
    layout = [(key, shape) for group in groups for m in group
              for key, shape in ((m.a_key, m.a_shape(out_rank)), (m.b_key, m.b_shape(out_rank)))]
    progress = config.progress
    if progress is None:
        progress = len(groups) * method.passes * len(donors) >= PROGRESS_MIN_READS
    adapter_config = merged_adapter_config(donors, method, options, rank, modules)
    refactor = None
    if config.refactor_rank is not None:
        alpha = config.refactor_alpha if config.refactor_alpha is not None else float(config.refactor_rank)
        refactor = (lora_scale(adapter_config), config.refactor_rank, alpha)
        adapter_config.update(r=config.refactor_rank, lora_alpha=alpha, use_rslora=False)

    reads = DonorReads([d.weight_file for d in donors], whole=len(groups) == 1 and method.passes == 1,
                       float32=method.float32_inputs)
    with atomic_output_dir(config.out, config.overwrite) as tmp, contextlib.closing(reads):
        writer = SafetensorsStreamWriter(tmp / WEIGHT_FILE, layout, dtype)
        try:
            stream_modules(donors, weights, method, options, groups, rank, writer, progress, reads, refactor)
            adapter_sha256 = writer.close()
        except BaseException:
            writer.abort()
            raise
        write_json(tmp / CONFIG_FILE, adapter_config)
        digests = reads.result()
        fingerprints = verify_scored(names, paths, scored, digests)
        write_json(tmp / MERGE_INFO_FILE, {
            "method": method.name,
            "donors": names,
            "weights": weights,
            "sha256": digests,
            "fingerprints": fingerprints,
            "key": merge_key(config, names, weights, fingerprints),
            "adapter_sha256": adapter_sha256,
            "paths": [str(p) for p in paths],
            "engine_version": __version__,
            "options": {name: getattr(options, name) for name in sorted(method.options)},
            "refactor": None if refactor is None else {"method_r": rank, "r": refactor[1], "lora_alpha": refactor[2]},
            "r": adapter_config["r"],
            "lora_alpha": adapter_config["lora_alpha"],
            "dtype": str(dtype).removeprefix("torch."),
            "modules": len(modules),
        })
    log.info("merged %d donors with %s into %s (r=%d)", len(donors), method.name, config.out, adapter_config["r"])
    return Path(config.out)
