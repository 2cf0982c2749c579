"""Each merge method against an independent computation and against PEFT's add_weighted_adapter.

Where PEFT defines the same operation we compare tensors; where we deliberately differ (linear's plain mean of
the factors) the test says so and checks our formula directly.
"""
from __future__ import annotations
from engine.api import merge

import pytest
import torch
from lora_math import (
    exact_delta, factors_of_state, peft_weighted_adapter, read_config, read_factors, read_scale,
)
from peft.utils import merge_utils

from engine.core.errors import ConfigError
from engine.merge.sparse import dare_keep_mask

QV = ("qv1", "qv3", "qv5")
UNEVEN = [0.6, 0.3, 0.1]


def paths(donors, names):
    return [donors[n] for n in names]


def assert_factors_close(ours: dict, theirs: dict, atol: float) -> None:
    assert ours.keys() == theirs.keys()
    for module in ours:
        for mine, ref in zip(ours[module], theirs[module]):
            torch.testing.assert_close(mine, ref, atol=atol, rtol=0)


def assert_deltas_close(ours: dict, theirs: dict, atol: float) -> None:
    assert ours.keys() == theirs.keys()
    for module in ours:
        torch.testing.assert_close(ours[module], theirs[module], atol=atol, rtol=0)


def merged_delta(adapter) -> dict:
    scale = read_scale(adapter)
    return {m: scale * b @ a for m, (a, b) in read_factors(adapter).items()}


def test_linear_is_the_plain_mean_of_A_and_of_B(donors, tmp_path):
    out = merge(paths(donors, QV), out=tmp_path / "linear")
    inputs = [read_factors(p) for p in paths(donors, QV)]
    expected = {m: (sum(f[m][0] for f in inputs) / 3, sum(f[m][1] for f in inputs) / 3) for m in inputs[0]}
    assert_factors_close(read_factors(out), expected, atol=1e-6)
    config = read_config(out)
    assert (config["r"], config["lora_alpha"]) == (8, 16)  # equal scales: the donors' alpha is kept


def test_linear_folds_differing_scales_into_B(donors, scaled_donor, tmp_path):
    inputs = [donors["qv1"], scaled_donor]
    out = merge(inputs, weights=[0.25, 0.75], out=tmp_path / "linear")
    factors = [read_factors(p) for p in inputs]
    scales = [read_scale(p) for p in inputs]  # 2.0 and 0.5
    expected = {m: (0.25 * factors[0][m][0] + 0.75 * factors[1][m][0],
                    0.25 * scales[0] * factors[0][m][1] + 0.75 * scales[1] * factors[1][m][1]) for m in factors[0]}
    assert_factors_close(read_factors(out), expected, atol=1e-6)
    assert read_scale(out) == 1.0 and read_config(out)["lora_alpha"] == 8


def test_linear_equals_peft_linear_given_squared_weights(donors, base_dir, tmp_path):
    """PEFT's linear scales both factors by sqrt(w_i s_i); fed w_i² it yields A = sqrt(s) Σ w_i A_i and
    B = sqrt(s) Σ w_i B_i, i.e. exactly our ΔW = s (Σ w_i B_i)(Σ w_i A_i) when the donors share a scale."""
    out = merge(paths(donors, QV), weights=UNEVEN, out=tmp_path / "linear")
    state, _ = peft_weighted_adapter(base_dir, paths(donors, QV), [w * w for w in UNEVEN], "linear")
    peft_delta = {m: b @ a for m, (a, b) in factors_of_state(state).items()}  # PEFT writes alpha = r
    assert_deltas_close(merged_delta(out), peft_delta, atol=1e-6)


def test_linear_deliberately_differs_from_peft_for_uneven_weights(donors, base_dir, tmp_path):
    """Fed the same weights, PEFT's ΔW has cross terms sqrt(w_i w_j) (N times ours for uniform weights); ours
    has w_i w_j, the product of the weighted means. Both formulas are checked, and that they differ."""
    out = merge(paths(donors, QV), weights=UNEVEN, out=tmp_path / "linear")
    inputs = [read_factors(p) for p in paths(donors, QV)]
    ours_expected = {m: 2.0 * sum(w * f[m][1] for w, f in zip(UNEVEN, inputs)) @ sum(w * f[m][0] for w, f in zip(UNEVEN, inputs))
                     for m in inputs[0]}
    assert_deltas_close(merged_delta(out), ours_expected, atol=1e-6)
    state, _ = peft_weighted_adapter(base_dir, paths(donors, QV), UNEVEN, "linear")
    roots = [(2.0 * w) ** 0.5 for w in UNEVEN]
    peft_expected = {m: sum(r * f[m][1] for r, f in zip(roots, inputs)) @ sum(r * f[m][0] for r, f in zip(roots, inputs))
                     for m in inputs[0]}
    assert_deltas_close({m: b @ a for m, (a, b) in factors_of_state(state).items()}, peft_expected, atol=1e-5)
    module = next(iter(ours_expected))
    assert (ours_expected[module] - peft_expected[module]).abs().max() > 1e-2


def test_cat_reproduces_the_exact_weighted_delta_across_ranks_and_modules(donors, tmp_path):
    inputs = paths(donors, ("qv1", "qkvo2", "qv3"))  # r = 8, 4, 8; qkvo2 alone adapts k/o
    weights = [0.5, 0.3, 0.2]
    out = merge(inputs, weights=weights, method="cat", out=tmp_path / "cat")
    assert read_config(out)["r"] == 20 and read_scale(out) == 1.0
    assert sorted(read_config(out)["target_modules"]) == ["k_proj", "o_proj", "q_proj", "v_proj"]
    assert_deltas_close(merged_delta(out), exact_delta(inputs, weights), atol=1e-5)


def test_cat_matches_peft_factor_by_factor(donors, base_dir, tmp_path):
    out = merge(paths(donors, QV), weights=UNEVEN, method="cat", out=tmp_path / "cat")
    state, peft_config = peft_weighted_adapter(base_dir, paths(donors, QV), UNEVEN, "cat")
    assert read_config(out)["r"] == peft_config.r == 24
    assert_factors_close(read_factors(out), factors_of_state(state), atol=1e-6)


def test_svd_matches_peft_and_the_truncated_exact_delta(donors, base_dir, tmp_path):
    inputs = paths(donors, ("qv1", "qkvo2", "qv3"))
    weights = [0.5, 0.3, 0.2]
    out = merge(inputs, weights=weights, method="svd", out=tmp_path / "svd")
    state, peft_config = peft_weighted_adapter(base_dir, inputs, weights, "svd")
    assert read_config(out)["r"] == peft_config.r == 8  # the largest donor rank, as in PEFT
    # SVD factors are unique only up to sign, so compare the products
    assert_deltas_close(merged_delta(out), {m: b @ a for m, (a, b) in factors_of_state(state).items()}, atol=1e-5)
    for module, delta in exact_delta(inputs, weights).items():
        u, s, vh = torch.linalg.svd(delta.double())
        truncated = (u[:, :8] * s[:8]) @ vh[:8]
        torch.testing.assert_close(merged_delta(out)[module], truncated.float(), atol=1e-5, rtol=0)


def test_svd_rank_is_chosen_by_the_user(donors, tmp_path):
    inputs = paths(donors, ("qv1", "qv3"))
    out = merge(inputs, method="svd", svd_rank=16, out=tmp_path / "svd16")
    assert read_config(out)["r"] == 16  # Σ r_i = 16: no truncation, so exact
    assert_deltas_close(merged_delta(out), exact_delta(inputs, [0.5, 0.5]), atol=1e-5)


@pytest.mark.parametrize("majority_sign", ["total", "frequency"])
def test_ties_matches_peft(donors, base_dir, tmp_path, majority_sign):
    out = merge(paths(donors, QV), weights=UNEVEN, method="ties", density=0.5, majority_sign=majority_sign,
                       out=tmp_path / "ties")
    state, _ = peft_weighted_adapter(base_dir, paths(donors, QV), UNEVEN, "ties", density=0.5,
                                     majority_sign_method=majority_sign)
    assert_factors_close(read_factors(out), factors_of_state(state), atol=1e-6)
    assert read_scale(out) == 1.0


@pytest.mark.filterwarnings("ignore:The density 1.0 is greater")
@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_without_dropping_matches_peft(donors, base_dir, tmp_path, method):
    """density=1 keeps every entry, so the deterministic rest of DARE (weighting, sign election) is compared."""
    out = merge(paths(donors, QV), weights=UNEVEN, method=method, density=1.0, out=tmp_path / method)
    state, _ = peft_weighted_adapter(base_dir, paths(donors, QV), UNEVEN, method, density=1.0)
    assert_factors_close(read_factors(out), factors_of_state(state), atol=1e-6)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_with_our_masks_equals_peft_merge_functions(donors, tmp_path, method):
    """PEFT draws DARE masks from the global RNG in module order, which a streaming merge cannot replay; so we
    rebuild our own per-(donor, module, factor) masks and feed the masked factors to PEFT's merge_utils."""
    density, seed = 0.5, 7
    inputs = paths(donors, QV)
    out = merge(inputs, weights=UNEVEN, method=method, density=density, seed=seed, out=tmp_path / method)
    factors = [read_factors(p) for p in inputs]
    roots = torch.tensor([(w * read_scale(p)) ** 0.5 for w, p in zip(UNEVEN, inputs)])
    for module, (a, b) in read_factors(out).items():
        for index, (factor, merged) in enumerate((("A", a), ("B", b))):
            pruned = [f[module][index] * dare_keep_mask(f[module][index].shape, density, seed, i, module, factor) / density
                      for i, f in enumerate(factors)]
            if method == "dare_linear":
                expected = merge_utils.task_arithmetic(pruned, roots)
            else:
                stacked = torch.stack(pruned)
                sign_mask = merge_utils.calculate_majority_sign_mask(stacked, method="total")
                expected = merge_utils.disjoint_merge(stacked * roots.view(-1, 1, 1), sign_mask)
            torch.testing.assert_close(merged, expected, atol=1e-6, rtol=0)


def test_dare_masks_keep_density_and_are_unbiased_on_average(donors, tmp_path):
    """Statistical check of the random part: the kept share is `density`, and the mean over seeds tends to
    the undropped merge (1/density rescaling)."""
    inputs = paths(donors, QV)
    mask = dare_keep_mask(torch.Size([64, 256]), 0.3, 0, 0, "m", "A")
    assert abs(mask.mean().item() - 0.3) < 0.02  # 16384 draws: 3 sigma is about 0.011
    dense = read_factors(merge(inputs, method="dare_linear", density=1.0, out=tmp_path / "dense"))
    runs = [read_factors(merge(inputs, method="dare_linear", density=0.5, seed=s, out=tmp_path / f"s{s}"))
            for s in range(24)]
    module = next(iter(dense))
    mean_a = torch.stack([r[module][0] for r in runs]).mean(0)
    single_error = (runs[0][module][0] - dense[module][0]).norm()
    assert (mean_a - dense[module][0]).norm() < 0.35 * single_error  # about 1/sqrt(24) ≈ 0.2 expected
    assert not torch.equal(runs[0][module][0], runs[1][module][0])


@pytest.mark.parametrize("method,extra", [("linear", {}), ("ties", {"density": 0.5}),
                                          ("dare_linear", {"density": 0.5}), ("dare_ties", {"density": 0.5})])
def test_equal_rank_methods_reject_mixed_ranks_naming_donors(donors, tmp_path, method, extra):
    with pytest.raises(ConfigError) as caught:
        merge([donors["qv1"], donors["qkvo2"]], method=method, out=tmp_path / "x", **extra)
    message = str(caught.value)
    assert "r=4" in message and "r=8" in message and "donor1" in message and "donor2" in message
    assert not (tmp_path / "x").exists()


def test_output_dtype_follows_donors_unless_chosen(bf16_donors, tmp_path):
    from safetensors import safe_open

    def dtype_of(out):
        with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
            return f.get_tensor(next(iter(f.keys()))).dtype

    assert dtype_of(merge(bf16_donors, out=tmp_path / "bf16")) == torch.bfloat16
    assert dtype_of(merge(bf16_donors, out=tmp_path / "f32", dtype="float32")) == torch.float32


def test_weights_are_normalized_and_recorded(donors, tmp_path):
    a = read_factors(merge(paths(donors, ("qv1", "qv3")), weights=[2, 6], out=tmp_path / "a"))
    b = read_factors(merge(paths(donors, ("qv1", "qv3")), weights=[0.25, 0.75], out=tmp_path / "b"))
    assert_factors_close(a, b, atol=0)


def test_small_memory_budget_streams_modules_in_groups_with_the_same_result(donors, tmp_path):
    from engine.merge import MergeConfig
    from engine.merge.streaming import merge_with_config

    inputs = [str(p) for p in paths(donors, QV)]
    for method, extra in (("linear", {}), ("ties", {"density": 0.5}), ("svd", {})):
        whole = merge_with_config(MergeConfig(donors=inputs, method=method, out=tmp_path / f"{method}_whole", **extra))
        grouped = merge_with_config(MergeConfig(donors=inputs, method=method, out=tmp_path / f"{method}_grouped",
                                                accumulator_mb=0.004, **extra))  # ~4 KB: one module at a time
        assert_factors_close(read_factors(grouped), read_factors(whole), atol=0)


def test_options_must_fit_the_method(donors, tmp_path):
    with pytest.raises(ConfigError, match="density: required"):
        merge(paths(donors, QV), method="ties", out=tmp_path / "x")
    with pytest.raises(ConfigError, match="density: does not apply"):
        merge(paths(donors, QV), method="linear", density=0.5, out=tmp_path / "x")
    with pytest.raises(ConfigError, match="weights: 2 values for 3 donors"):
        merge(paths(donors, QV), weights=[1, 2], out=tmp_path / "x")
    with pytest.raises(ConfigError, match="method: unknown"):
        merge(paths(donors, QV), method="slerp", out=tmp_path / "x")
