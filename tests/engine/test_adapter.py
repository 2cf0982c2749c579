"""engine.core.adapter, the one reader of adapter folders: key grammar, PEFT's pattern rules, fingerprints."""
import json
import shutil

import pytest

from engine.core.adapter import fingerprint, open_adapter, parse_key, stat_signature
from engine.core.errors import DonorError
from engine.core.validate import base_spec, validate_donor
from tests.adapters import peft_scalings, with_adapter_name_in_keys, write_peft_adapter


@pytest.mark.parametrize("key, want", [
    ("base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight", ("model.layers.0.self_attn.q_proj", "lora_A", "weight")),
    ("base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight", ("model.layers.0.self_attn.q_proj", "lora_B", "weight")),
    ("base_model.model.model.embed_tokens.lora_embedding_A", ("model.embed_tokens", "lora_embedding_A", "weight")),
    ("base_model.model.model.layers.0.mlp.down_proj.lora_B.bias", ("model.layers.0.mlp.down_proj", "lora_B", "bias")),
    ("base_model.model.model.layers.0.mlp.down_proj.lora_magnitude_vector", ("model.layers.0.mlp.down_proj", "lora_magnitude_vector", "weight")),
])
def test_key_grammar(key, want):
    parsed = parse_key(key)
    assert (parsed.module, parsed.kind, parsed.param) == want


def test_a_saved_module_is_not_a_lora_key():
    assert parse_key("base_model.model.lm_head.weight") is None


@pytest.fixture(scope="module")
def patterned(base_dir, tmp_path_factory):
    """alpha_pattern {"mlp": 32} must NOT apply to mlp.down_proj (PEFT matches a pattern at a dotted suffix), while
    {"proj": 4} in rank_pattern matches nothing and "v_proj" does: the cases re.search got wrong."""
    root = tmp_path_factory.mktemp("patterned")
    return write_peft_adapter(base_dir, root / "d", seed=3, r=8, lora_alpha=16,
                              target_modules=["q_proj", "v_proj", "down_proj"], use_rslora=True,
                              rank_pattern={"proj": 4, "v_proj": 4}, alpha_pattern={"mlp": 32, "q_proj": 5})


def test_scales_follow_peft_exactly(base_dir, patterned):
    adapter = open_adapter("d", patterned)
    reference = peft_scalings(base_dir, patterned)
    assert reference.keys() == adapter.modules.keys()
    for module, factors in adapter.modules.items():
        assert factors.scale == pytest.approx(reference[module], rel=1e-12), module
    assert {f.rank for m, f in adapter.modules.items() if "v_proj" in m} == {4}
    assert {f.rank for m, f in adapter.modules.items() if "v_proj" not in m} == {8}
    assert not adapter.uniform_scale


def test_rank_pattern_donor_is_valid(base_dir, patterned):
    cfg = validate_donor("d", patterned, base_spec(str(base_dir)))
    assert cfg["rank_pattern"] == {"proj": 4, "v_proj": 4}


def test_adapter_name_keys_parse_like_plain_ones(pool_dir, tmp_path):
    plain = open_adapter("p", pool_dir / "qv" / "donor1")
    named = open_adapter("n", with_adapter_name_in_keys(pool_dir / "qv" / "donor1", tmp_path / "named"))
    assert plain.modules.keys() == named.modules.keys()
    assert all(".default." in f.a_key for f in named.modules.values())


def test_fingerprint_is_content(pool_dir, tmp_path):
    a = shutil.copytree(pool_dir / "qv" / "donor1", tmp_path / "a")
    b = shutil.copytree(pool_dir / "qv" / "donor1", tmp_path / "b")
    assert fingerprint(a) == fingerprint(b)
    assert stat_signature(a) != stat_signature(b)  # other folder, other inode: the driver cannot vouch for b
    cfg = json.loads((b / "adapter_config.json").read_text())
    cfg["lora_alpha"] += 1
    (b / "adapter_config.json").write_text(json.dumps(cfg))
    assert fingerprint(a) != fingerprint(b)
    shutil.copy(pool_dir / "qv" / "donor3" / "adapter_model.safetensors", a / "adapter_model.safetensors")
    assert fingerprint(a) != fingerprint(pool_dir / "qv" / "donor1")


def test_hostile_config_is_refused(pool_dir, tmp_path):
    d = shutil.copytree(pool_dir / "qv" / "donor1", tmp_path / "d")
    (d / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16,
                                                      "rank_pattern": {"q_proj": "eight"}}))
    with pytest.raises(DonorError, match="rank_pattern must map"):
        open_adapter("d", d)


def test_a_layouts_cache_stays_bounded_and_keeps_its_answers(pool_dir, tmp_path, monkeypatch):
    """Donors of many shapes never grow a `layouts` cache past LAYOUT_CACHE_MAX; a cached parse equals a fresh one."""
    import engine.core.adapter as adapter

    folders = sorted(p.parent for p in pool_dir.glob("*/*/adapter_config.json"))
    for alpha in (3, 5):  # other scales: other cache keys
        copy = shutil.copytree(folders[0], tmp_path / f"alpha{alpha}")
        cfg = json.loads((copy / "adapter_config.json").read_text())
        (copy / "adapter_config.json").write_text(json.dumps({**cfg, "lora_alpha": alpha}))
        folders.append(copy)
    unbounded: dict = {}
    monkeypatch.setattr(adapter, "LAYOUT_CACHE_MAX", 10**6)
    for folder in folders:
        open_adapter(folder.name, folder, unbounded)
    assert len(unbounded) > 2, "the pool must hold more than two shapes for the bound to matter"
    monkeypatch.setattr(adapter, "LAYOUT_CACHE_MAX", 2)
    layouts: dict = {}
    for folder in folders:
        cached = open_adapter(folder.name, folder, layouts)
        assert len(layouts) <= 2
        assert cached.modules == open_adapter(folder.name, folder).modules


def test_tensors_from_bytes_equal_safetensors_own_loader_and_copy_nothing(tmp_path):
    """The zero-copy reader behind read_weights and the merge: every dtype and shape as safetensors' loader gives
    it, each tensor a view into the one buffer (no copy), and a header that lies about its data is refused."""
    import struct

    import torch
    from safetensors.torch import load, save_file

    from engine.core.weights import read_whole, tensors_from_bytes

    path = tmp_path / "w.safetensors"
    save_file({"a": torch.randn(16, 64).bfloat16(), "b": torch.randn(3, 5), "half": torch.randn(2, 2).half(),
               "empty": torch.empty(0, 4), "ints": torch.arange(7), "flags": torch.tensor([True, False, True]),
               "f8": torch.randn(4, 4).to(torch.float8_e4m3fn)}, str(path), metadata={"format": "pt"})
    data = read_whole(path)
    views, reference = tensors_from_bytes(data), load(bytes(data))
    assert views.keys() == reference.keys()
    for key, want in reference.items():
        got = views[key]
        assert (got.dtype, got.shape) == (want.dtype, want.shape), key
        assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), key
    buffer = torch.frombuffer(data, dtype=torch.uint8)
    lo, hi = buffer.data_ptr(), buffer.data_ptr() + len(data)
    assert all(lo <= t.data_ptr() < hi for t in views.values() if t.numel())
    assert read_whole(path, max_bytes=len(data) - 1) is None

    (length,) = struct.unpack_from("<Q", data)
    header = json.loads(bytes(data[8:8 + length]))
    header["b"]["data_offsets"][1] += 4  # claims more bytes than its shape holds
    raw = json.dumps(header).encode().ljust(length)
    with pytest.raises(ValueError, match="'b'"):
        tensors_from_bytes(bytearray(data[:8] + raw + data[8 + length:]) if len(raw) == length
                           else bytearray(struct.pack("<Q", len(raw)) + raw + data[8 + length:]))
    with pytest.raises(ValueError, match="too short"):
        tensors_from_bytes(bytearray(b"\x01\x02"))


def test_one_header_parse_serves_every_file_of_that_shape_and_each_file_views_its_own_bytes(tmp_path):
    """The parse is cached by header bytes (donors of one shape share them): two files with the same header and
    different weights must each give their own values, and the flat view of the data (one dtype, back to back)
    holds exactly the tensors' elements; mixed dtypes get no flat view."""
    import torch
    from safetensors.torch import save_file

    from engine.core.weights import _view_plan, read_weights

    paths = []
    for seed in (0, 1):
        g = torch.Generator().manual_seed(seed)
        paths.append(tmp_path / f"w{seed}.safetensors")
        save_file({"x.lora_A.weight": torch.randn(4, 8, generator=g), "x.lora_B.weight": torch.randn(8, 4, generator=g)},
                  str(paths[-1]))
    assert paths[0].read_bytes()[:64] == paths[1].read_bytes()[:64]  # the same header
    _view_plan.cache_clear()
    first, second = read_weights(paths[0]), read_weights(paths[1])
    assert _view_plan.cache_info().hits == 1
    for path, loaded in ((paths[0], first), (paths[1], second)):
        from safetensors.torch import load_file

        want = load_file(str(path))
        assert all(torch.equal(loaded.tensors[k], want[k]) for k in want)
        assert torch.equal(loaded.flat, torch.cat([want[k].flatten() for k in sorted(want)]))
    assert not torch.equal(first.flat, second.flat)

    save_file({"a": torch.randn(4, 4), "b": torch.randn(4, 4).bfloat16()}, str(tmp_path / "mixed.safetensors"))
    assert read_weights(tmp_path / "mixed.safetensors").flat is None


def test_the_flat_finiteness_check_names_the_tensor_and_keeps_huge_finite_weights(tmp_path):
    import torch
    from safetensors.torch import save_file

    from engine.core.validate import check_finite_weights
    from engine.core.weights import read_weights

    path = tmp_path / "w.safetensors"
    save_file({"a.lora_A.weight": torch.full((4, 8), 3e38), "a.lora_B.weight": torch.ones(8, 4)}, str(path))
    loaded = read_weights(path)  # their sum overflows float32: the per-tensor checks decide, and pass
    check_finite_weights("d", path, loaded.tensors, loaded.flat)
    for bad in (float("nan"), float("inf"), float("-inf")):
        tensors = {"a.lora_A.weight": torch.ones(4, 8), "a.lora_B.weight": torch.ones(8, 4)}
        tensors["a.lora_B.weight"][5, 2] = bad
        save_file(tensors, str(path))
        loaded = read_weights(path)
        assert loaded.flat is not None
        with pytest.raises(DonorError, match=r"non-finite weights \(NaN/Inf\) in a.lora_B.weight"):
            check_finite_weights("d", path, loaded.tensors, loaded.flat)
