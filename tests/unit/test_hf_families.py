"""Llama 3.x RoPE scaling, Qwen3-MoE and Mixtral: config mapping both ways, refusals, the key maps
against a built megatron-core model, bitwise HF round trips, and HF logits at TP=1 (1e-4, float32).

The megatron models here load the full-layout state dict directly (``load_state_dict``), so these
tests do not depend on the TP/PP/EP loader; tests/distributed/test_convert_families.py covers layouts.
"""

from __future__ import annotations

import inspect
import json

import pytest
import torch
from safetensors.torch import load_file

from rlad_megatron.config import ConfigError, ModelConfig, load_config
from rlad_megatron.conversion import convert_hf_to_megatron, convert_megatron_to_hf
from rlad_megatron.hf import hf_config_from_model, model_config_from_hf
from rlad_megatron.hf.config_map import MEGATRON_LLAMA3_ROPE
from tests.harness import run_distributed
from tests.unit.hf_fixtures import LLAMA3_ROPE, VOCAB, save_tiny_hf, tiny_hf_model

pytest.importorskip("transformers")

FAMILIES = ["llama3", "qwen3_moe", "mixtral"]
BATCH = 2
# Long enough that the scaled RoPE frequencies turn by a visible angle (see hf_fixtures.LLAMA3_ROPE).
SEQ = 64


def _hf_config(family: str, **changes) -> dict:
    config = tiny_hf_model(family).config.to_dict()
    config.update(changes)
    return config


# ---------------------------------------------------------------- config mapping


def test_megatron_llama3_constants_are_the_ones_we_check():
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    params = inspect.signature(RotaryEmbedding._apply_scaling).parameters
    assert {k: params[k].default for k in MEGATRON_LLAMA3_ROPE} == MEGATRON_LLAMA3_ROPE


def test_llama3_rope_from_both_config_formats_and_back():
    import transformers

    # A Llama 3.1 config.json as on the Hub: rope_theta + a rope_scaling dict.
    hub = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_key_value_heads": 2,
           "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": VOCAB, "max_position_embeddings": 131072,
           "rope_theta": 500000.0, "rope_scaling": {**LLAMA3_ROPE, "factor": 8.0}}
    cfg = model_config_from_hf(hub)
    assert (cfg.rope_scaling, cfg.rope_scaling_factor, cfg.rotary_base) == (True, 8.0, 500000.0)
    # What transformers 5 writes: rope_parameters with the theta inside.
    written = _hf_config("llama3")
    assert "rope_parameters" in written and written["rope_parameters"]["rope_type"] == "llama3"
    cfg = model_config_from_hf(written)
    assert (cfg.rope_scaling, cfg.rope_scaling_factor, cfg.rotary_base) == (True, LLAMA3_ROPE["factor"], 500000.0)
    # Without the source config.json (a training checkpoint), the way back writes both formats.
    back = hf_config_from_model(cfg, model_type="llama")
    assert model_config_from_hf(back) == cfg
    loaded = transformers.LlamaConfig.from_dict(back).rope_parameters
    assert loaded["rope_type"] == "llama3" and loaded["factor"] == LLAMA3_ROPE["factor"]


def test_moe_config_mapping_and_back():
    qwen = model_config_from_hf(_hf_config("qwen3_moe"))
    assert (qwen.num_experts, qwen.moe_router_topk, qwen.moe_ffn_hidden_size, qwen.ffn_hidden_size) == (4, 2, 32, 128)
    assert qwen.moe_layer_pattern == "10" and qwen.moe_norm_topk_prob and qwen.qk_layernorm
    assert qwen.moe_aux_loss_coeff == 0.0  # never taken from router_aux_loss_coef: off unless asked for
    sparse = model_config_from_hf(_hf_config("qwen3_moe", num_hidden_layers=4, decoder_sparse_step=2,
                                             mlp_only_layers=[]))
    assert sparse.moe_layer_pattern == "0101"  # layer i is MoE iff (i + 1) % step == 0
    mixtral = model_config_from_hf(_hf_config("mixtral"))
    assert (mixtral.num_experts, mixtral.moe_ffn_hidden_size, mixtral.moe_layer_pattern) == (4, 128, None)
    assert not mixtral.qk_layernorm and mixtral.moe_norm_topk_prob
    for cfg, model_type in ((qwen, "qwen3_moe"), (sparse, "qwen3_moe"), (mixtral, "mixtral")):
        assert model_config_from_hf(hf_config_from_model(cfg, model_type=model_type)) == cfg
    with pytest.raises(ValueError, match="model_type: llama is a dense architecture"):
        hf_config_from_model(mixtral, model_type="llama")


REFUSED = [
    ("llama3", {"rope_parameters": {**LLAMA3_ROPE, "rope_theta": 5e5, "low_freq_factor": 2.0}},
     r"rope_parameters\.low_freq_factor: .*fixes it at 1, got 2"),
    ("llama3", {"rope_parameters": {**LLAMA3_ROPE, "rope_theta": 5e5, "high_freq_factor": 8.0}},
     r"rope_parameters\.high_freq_factor: .*fixes it at 4, got 8"),
    ("llama3", {"rope_parameters": {**LLAMA3_ROPE, "rope_theta": 5e5, "original_max_position_embeddings": 4096}},
     r"rope_parameters\.original_max_position_embeddings: .*fixes it at 8192, got 4096"),
    ("llama", {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}},
     r"rope_parameters\.rope_type: expected 'default' or 'llama3'.*got 'yarn'"),
    ("llama", {"rope_parameters": None, "rope_theta": 1e4, "rope_scaling": {"type": "linear", "factor": 2.0}},
     r"rope_scaling\.rope_type: .*got 'linear'"),
    ("mixtral", {"sliding_window": 4096}, r"sliding_window: expected null .*got 4096"),
    ("qwen3_moe", {"use_sliding_window": True}, r"use_sliding_window: expected false"),
    ("qwen3_moe", {"shared_expert_intermediate_size": 64}, r"shared_expert_intermediate_size: expected 0 .*got 64"),
    ("qwen3_moe", {"n_group": 8, "topk_group": 2}, r"n_group: expected 1 .*got 8"),
    ("qwen3_moe", {"scoring_func": "sigmoid"}, r"scoring_func: expected 'softmax' .*got 'sigmoid'"),
    ("mixtral", {"router_jitter_noise": 0.1}, r"router_jitter_noise: expected 0.0 .*got 0.1"),
]


@pytest.mark.parametrize("family,changes,match", REFUSED, ids=[m.split(":")[0] for _, _, m in REFUSED])
def test_unsupported_variants_are_refused_in_one_line(family, changes, match):
    with pytest.raises(ValueError, match="^config.json: " + match) as err:
        model_config_from_hf(_hf_config(family, **changes))
    assert "\n" not in str(err.value)


def test_unsupported_variant_is_refused_at_conversion(tmp_path):
    hf_dir = save_tiny_hf(tmp_path / "hf", "qwen3_moe")
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps(config | {"shared_expert_intermediate_size": 64}))
    with pytest.raises(ValueError, match=r"hf/config.json: shared_expert_intermediate_size"):
        convert_hf_to_megatron(hf_dir=hf_dir, out_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


CONFIG_ERRORS = [
    (["--student.parallel.expert_model_parallel_size=2"], "student.parallel.expert_model_parallel_size: expected 1"),
    (["--student.model.num_experts=4", "--student.parallel.expert_model_parallel_size=3"],
     "expected a divisor of student.model.num_experts=4, got 3"),
    (["--student.model.num_experts=4", "--student.model.moe_router_topk=5"],
     "moe_router_topk: expected 1..num_experts"),
    (["--student.model.num_experts=4", "--student.model.moe_layer_pattern=1x"], "moe_layer_pattern: expected 2 char"),
    (["--student.model.moe_ffn_hidden_size=32"], "student.model.moe_ffn_hidden_size: expected null for a dense"),
    (["--teacher.model.num_experts=4", "--teacher.model.moe_aux_loss_coeff=0.01"],
     "teacher.model.moe_aux_loss_coeff: expected 0"),
    (["--student.model.num_experts=4", "--student.parallel.tensor_model_parallel_size=2",
      "--teacher.parallel.tensor_model_parallel_size=2"],
     "student.parallel.tensor_model_parallel_size: expected 1 for an MoE student"),
]


@pytest.mark.parametrize("overrides,match", CONFIG_ERRORS, ids=[m.split(":")[0] for _, m in CONFIG_ERRORS])
def test_moe_config_errors_name_the_field(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


def test_moe_config_loads():
    # The pattern is quoted: YAML would read 01 as the integer 1.
    cfg = load_config(None, ["--student.model.num_experts=4", "--student.model.moe_layer_pattern='01'",
                             "--student.model.moe_aux_loss_coeff=0.01",
                             "--student.parallel.expert_model_parallel_size=2"])
    assert cfg.student.model.moe_layers == [False, True]
    # A frozen MoE teacher may combine TP and EP (megatron needs sequence parallelism only to train).
    teacher = load_config(None, ["--teacher.model.num_experts=4", "--teacher.parallel.expert_model_parallel_size=2",
                                 "--student.parallel.tensor_model_parallel_size=2",
                                 "--teacher.parallel.tensor_model_parallel_size=2"])
    assert teacher.teacher.parallel.expert_model_parallel_size == 2
    assert ModelConfig().moe_layers == [False, False]


# ---------------------------------------------------------------- megatron models (1 gloo rank)


def _megatron_side(rank, world_size, meg_dirs, tokens_BS):
    """Per converted dir: model state names/shapes, RoPE inv_freq and logits (and plain-RoPE logits)."""
    from rlad_megatron.config import ModelSection
    from rlad_megatron.conversion import read_megatron_checkpoint
    from rlad_megatron.distributed import initialize_model_parallel
    from rlad_megatron.models.builder import build_gpt_model
    from rlad_megatron.models.equivalence import megatron_logits

    groups = initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1, seed=3)
    out = {}
    for key, path in meg_dirs.items():
        full, cfg, _ = read_megatron_checkpoint(path)
        variants = {"model": cfg}
        if cfg.rope_scaling:  # negative control: the same weights without the scaling
            variants["plain_rope"] = ModelConfig(**{**cfg.__dict__, "rope_scaling": False})
        for name, model_cfg in variants.items():
            model = build_gpt_model(ModelSection(model=model_cfg), groups, device=torch.device("cpu"))
            state = {n: tuple(t.shape) for n, t in model.state_dict().items() if not n.endswith("._extra_state")}
            result = model.load_state_dict(full, strict=False)
            assert not result.unexpected_keys, result.unexpected_keys
            assert all(n.endswith("._extra_state") for n in result.missing_keys), result.missing_keys
            out[(key, name)] = {
                "state": state, "full": {n: tuple(t.shape) for n, t in full.items()},
                "inv_freq": model.rotary_pos_emb.inv_freq.clone(),
                "logits": megatron_logits(model, groups, tokens_BS, vocab_size=cfg.vocab_size)}
    return out


def test_families_match_hf_at_tp1(tmp_path):
    from transformers import AutoModelForCausalLM

    from rlad_megatron.models.equivalence import compare_logits, hf_logits

    cases = {f: {} for f in FAMILIES} | {"qwen3_moe_no_norm_topk": {"norm_topk_prob": False}}
    tokens_BS = torch.randint(0, VOCAB, (BATCH, SEQ))
    meg_dirs, reference, hf_inv_freq = {}, {}, {}
    for key, changes in cases.items():
        family = key.removesuffix("_no_norm_topk")
        hf_dir = save_tiny_hf(tmp_path / f"{key}_hf", family, config=changes)
        convert_hf_to_megatron(hf_dir=hf_dir, out_dir=tmp_path / f"{key}_meg")
        meg_dirs[key] = tmp_path / f"{key}_meg"
        reference[key] = hf_logits(hf_dir, tokens_BS)
        hf_inv_freq[key] = AutoModelForCausalLM.from_pretrained(str(hf_dir)).model.rotary_emb.inv_freq
    results = run_distributed(_megatron_side, 1, args=(meg_dirs, tokens_BS))[0]
    for key in cases:
        got = results[(key, "model")]
        # The key maps name exactly the tensors megatron-core builds, with the same shapes.
        assert got["state"] == got["full"], sorted(set(got["state"].items()) ^ set(got["full"].items()))[:6]
        torch.testing.assert_close(got["inv_freq"], hf_inv_freq[key].float(), rtol=1e-6, atol=0)
        stats = compare_logits(reference[key], got["logits"])
        assert stats["max_abs_diff"] < 1e-4, (key, stats)
    # Without the scaling, the llama3 fixture's logits are visibly off: the test can see the difference.
    plain = compare_logits(reference["llama3"], results[("llama3", "plain_rope")]["logits"])
    assert plain["max_abs_diff"] > 1e-3, plain
    moe_state = results[("qwen3_moe", "model")]["state"]
    assert "decoder.layers.0.mlp.router.weight" in moe_state and "decoder.layers.1.mlp.linear_fc1.weight" in moe_state


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_is_bitwise(tmp_path, family):
    from transformers import AutoModelForCausalLM

    hf_dir = save_tiny_hf(tmp_path / "hf", family)
    convert_hf_to_megatron(hf_dir=hf_dir, out_dir=tmp_path / "meg", tp=2, pp=2, writer="full+ranks")
    convert_megatron_to_hf(megatron_dir=tmp_path / "meg", out_dir=tmp_path / "back")
    original, back = load_file(hf_dir / "model.safetensors"), load_file(tmp_path / "back" / "model.safetensors")
    assert set(original) == set(back)
    for name, t in original.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t), name
    hf_config = json.loads((hf_dir / "config.json").read_text())
    back_config = json.loads((tmp_path / "back" / "config.json").read_text())
    for key in ("rope_parameters", "rope_scaling", "num_experts", "num_local_experts", "mlp_only_layers",
                "norm_topk_prob", "moe_intermediate_size"):
        assert back_config.get(key) == hf_config.get(key), key
    tokens = torch.randint(0, VOCAB, (2, 7))
    logits = [AutoModelForCausalLM.from_pretrained(str(d)).eval()(input_ids=tokens).logits
              for d in (hf_dir, tmp_path / "back")]
    assert torch.equal(logits[0], logits[1])
