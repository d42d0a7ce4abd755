"""HF <-> megatron conversion on tiny random models: key maps, QKV layout, bitwise round trips, errors."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from rlad_megatron.config import ModelConfig
from rlad_megatron.conversion import convert_hf_to_megatron, convert_megatron_to_hf, read_megatron_checkpoint
from rlad_megatron.hf import hf_config_from_model, model_config_from_hf
from rlad_megatron.hf.keymaps import fuse_qkv, split_qkv
from tests.unit.hf_fixtures import VOCAB, save_tiny_hf

pytest.importorskip("transformers")

ARCHS = [("llama", False), ("qwen2", True), ("qwen3", False), ("llama", True)]


def _reference_qkv(q, k, v, *, num_heads, num_groups, head_dim):
    """Row order megatron-core's SelfAttention expects, built head by head."""
    rows = []
    per_group = num_heads // num_groups
    for g in range(num_groups):
        for h in range(g * per_group, (g + 1) * per_group):
            rows.append(q[h * head_dim:(h + 1) * head_dim])
        rows.append(k[g * head_dim:(g + 1) * head_dim])
        rows.append(v[g * head_dim:(g + 1) * head_dim])
    return torch.cat(rows)


@pytest.mark.parametrize("heads,groups", [(4, 2), (8, 8), (6, 1)])
def test_qkv_fusion_matches_megatron_group_layout(heads, groups):
    head_dim, hidden = 3, 5
    q, k, v = (torch.randn(n * head_dim, hidden) for n in (heads, groups, groups))
    fused = fuse_qkv(q, k, v, num_heads=heads, num_groups=groups, head_dim=head_dim)
    assert torch.equal(fused, _reference_qkv(q, k, v, num_heads=heads, num_groups=groups, head_dim=head_dim))
    for a, b in zip(split_qkv(fused, num_heads=heads, num_groups=groups, head_dim=head_dim), (q, k, v)):
        assert torch.equal(a, b)
    bq, bk, bv = q[:, 0], k[:, 0], v[:, 0]  # biases: the same layout on 1-D tensors
    fused_b = fuse_qkv(bq, bk, bv, num_heads=heads, num_groups=groups, head_dim=head_dim)
    assert torch.equal(fused_b, fused[:, 0])


@pytest.mark.parametrize("model_type,tied", ARCHS)
def test_round_trip_is_bitwise(tmp_path, model_type, tied):
    hf_dir = save_tiny_hf(tmp_path / "hf", model_type, tied=tied)
    summary = convert_hf_to_megatron(hf_dir=hf_dir, out_dir=tmp_path / "meg", tp=2, pp=2, writer="full+ranks")
    assert summary["model_type"] == model_type
    convert_megatron_to_hf(megatron_dir=tmp_path / "meg", out_dir=tmp_path / "back", tokenizer_dir=hf_dir)
    original, back = load_file(hf_dir / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert set(original) == set(back)
    for name, t in original.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    assert (tmp_path / "back" / "generation_config.json").is_file()  # copied with --tokenizer

    meg, cfg, _ = read_megatron_checkpoint(tmp_path / "meg")
    emb = meg["embedding.word_embeddings.weight"]
    assert emb.shape[0] == 256 and torch.count_nonzero(emb[VOCAB:]) == 0  # 250 padded for 128 x TP2

    # The per-rank layout alone reassembles to the same full state dict.
    os.remove(tmp_path / "meg" / "model.safetensors")
    meg_ranks, _, _ = read_megatron_checkpoint(tmp_path / "meg")
    assert set(meg_ranks) == set(meg) and all(torch.equal(meg_ranks[n], meg[n]) for n in meg)


def test_round_trip_keeps_bfloat16_and_reads_sharded_input(tmp_path):
    hf_dir = save_tiny_hf(tmp_path / "hf", "qwen3", dtype=torch.bfloat16, max_shard_size="40KB")
    assert (hf_dir / "model.safetensors.index.json").is_file()
    convert_hf_to_megatron(hf_dir=hf_dir, out_dir=tmp_path / "meg")
    _, cfg, _ = read_megatron_checkpoint(tmp_path / "meg")
    assert cfg.params_dtype == "bfloat16"
    convert_megatron_to_hf(megatron_dir=tmp_path / "meg", out_dir=tmp_path / "back", max_shard_bytes=30_000)
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())["weight_map"]
    original = {}
    for f in set(index.values()):
        original.update(load_file(hf_dir / f))
    back_index = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(back_index.values())) > 1
    back = {}
    for f in set(back_index.values()):
        back.update(load_file(tmp_path / "back" / f))
    assert set(back) == set(original)
    for name, t in original.items():
        assert back[name].dtype == torch.bfloat16 and torch.equal(back[name], t), name


def test_converted_back_loads_in_transformers_with_same_logits(tmp_path):
    from transformers import AutoModelForCausalLM

    hf_dir = save_tiny_hf(tmp_path / "hf", "qwen2", tied=True)
    convert_hf_to_megatron(hf_dir=hf_dir, out_dir=tmp_path / "meg", tp=2)
    convert_megatron_to_hf(megatron_dir=tmp_path / "meg", out_dir=tmp_path / "back")
    tokens = torch.randint(0, VOCAB, (2, 7))
    logits = [AutoModelForCausalLM.from_pretrained(str(d)).eval()(input_ids=tokens).logits
              for d in (hf_dir, tmp_path / "back")]
    assert torch.equal(logits[0], logits[1])


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "qwen3"])
def test_config_maps_both_ways(model_type):
    hf = hf_config_from_model(ModelConfig(num_query_groups=2, kv_channels=16, rotary_base=1e6,
                                          add_qkv_bias=model_type == "qwen2", qk_layernorm=model_type == "qwen3"),
                              model_type=model_type)
    cfg = model_config_from_hf(hf)
    assert hf_config_from_model(cfg) == hf
    assert cfg.rotary_base == 1e6 and cfg.kv_channels == 16


# ---------------------------------------------------------------- bad inputs


def _assert_fails_cleanly(tmp_path, match, **kwargs):
    out = tmp_path / "out"
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        convert_hf_to_megatron(hf_dir=tmp_path / "hf", out_dir=out, **kwargs)
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no temporary directory left behind


def _rewrite(path, fn):
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_truncated_safetensors_names_the_file(tmp_path):
    hf_dir = save_tiny_hf(tmp_path / "hf", "llama")
    path = hf_dir / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    _assert_fails_cleanly(tmp_path, "model.safetensors.*truncated")


def test_unknown_model_type(tmp_path):
    hf_dir = save_tiny_hf(tmp_path / "hf", "llama")
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps(config | {"model_type": "gpt2"}))
    _assert_fails_cleanly(tmp_path, "config.json: model_type.*'gpt2'")


def test_unsupported_rope_scaling(tmp_path):
    hf_dir = save_tiny_hf(tmp_path / "hf", "llama")
    config = json.loads((hf_dir / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 500000.0, "factor": 8.0}
    (hf_dir / "config.json").write_text(json.dumps(config))
    _assert_fails_cleanly(tmp_path, "rope_type.*yarn")


def test_missing_tensor_is_named(tmp_path):
    save_tiny_hf(tmp_path / "hf", "qwen2")
    _rewrite(tmp_path / "hf" / "model.safetensors", lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"))
    _assert_fails_cleanly(tmp_path, "missing tensor 'model.layers.1.self_attn.k_proj.bias'")


def test_unexpected_tensor_is_named(tmp_path):
    save_tiny_hf(tmp_path / "hf", "llama")
    _rewrite(tmp_path / "hf" / "model.safetensors",
             lambda t: t.update({"model.layers.0.self_attn.q_norm.weight": torch.ones(16)}))
    _assert_fails_cleanly(tmp_path, "model.safetensors: unexpected tensor 'model.layers.0.self_attn.q_norm.weight'")


def test_shape_mismatch_is_named(tmp_path):
    save_tiny_hf(tmp_path / "hf", "qwen3")
    _rewrite(tmp_path / "hf" / "model.safetensors",
             lambda t: t.update({"model.layers.0.mlp.up_proj.weight": torch.zeros(100, 64)}))
    _assert_fails_cleanly(tmp_path, r"model.safetensors: tensor 'model.layers.0.mlp.up_proj.weight': "
                                    r"expected shape \(128, 64\), got \(100, 64\)")


def test_tp_that_does_not_divide_heads(tmp_path):
    save_tiny_hf(tmp_path / "hf", "llama")
    _assert_fails_cleanly(tmp_path, "tensor_model_parallel_size: expected a divisor", tp=3)


def test_pickle_only_checkpoint_is_refused(tmp_path):
    hf_dir = save_tiny_hf(tmp_path / "hf", "llama")
    (hf_dir / "model.safetensors").rename(hf_dir / "pytorch_model.bin")
    _assert_fails_cleanly(tmp_path, "only safetensors.*pytorch_model.bin")


def test_existing_output_is_not_clobbered(tmp_path):
    save_tiny_hf(tmp_path / "hf", "llama")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ValueError, match="not empty"):
        convert_hf_to_megatron(hf_dir=tmp_path / "hf", out_dir=out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    convert_hf_to_megatron(hf_dir=tmp_path / "hf", out_dir=out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
