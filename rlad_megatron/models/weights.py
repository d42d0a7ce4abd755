"""The one way weights get into a live model, and out of it.

    model = build_model(cfg.student, groups, device=device)     # built, then ``cfg.student.load`` loaded
    load_weights(model, "runs/sft/student", groups)            # any checkpoint kind, any TP/PP
    load_state(model, full_tensors, vocab_size=V)               # full-layout tensors already in memory

Resharding has one mechanism: megatron-core's own ``model.sharded_state_dict()``. Each of its
``ShardedTensor``s says which slice of which global tensor this rank's parameter holds (TP split,
pipeline stage layer offset, the SwiGLU gate/up halves, the tied output layer's copy of the
embedding), and its data is a view of the parameter. A dist checkpoint is read by megatron's
``dist_checkpointing`` against those same descriptions; full-layout tensors (a converted
directory's safetensors, or an HF directory through the key maps of :mod:`rlad_megatron.hf`)
are sliced here by them. So every layout megatron-core can shard loads from every source, and
no slicing rule of ours mirrors megatron's.

Each rank reads only the decoder layers of its pipeline stage from safetensors. Vocabulary rows
are re-padded to the model's padded size (rows past the true vocabulary are zero), so a
directory converted for one TP loads at any TP.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import torch
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

from rlad_megatron.checkpointing import load_checkpoint, save_checkpoint
from rlad_megatron.config import ModelConfig, ModelSection
from rlad_megatron.distributed.groups import ParallelGroups
from rlad_megatron.distributed.init import single_process_world
from rlad_megatron.hf import keymaps as km
from rlad_megatron.hf.checkpoint import (
    MODEL_CONFIG_KEY,
    checkpoint_kind,
    dist_checkpoint_config,
    dist_checkpoint_path,
    read_checkpoint_config,
    stage_tensors,
)
from rlad_megatron.hf.config_map import head_dim
from rlad_megatron.hf.convert import pad_vocab
from rlad_megatron.models.builder import build_gpt_model


def build_model(section: ModelSection, groups: ParallelGroups, *, device: torch.device) -> torch.nn.Module:
    """This rank's stage of ``section.model``, with ``section.load``'s weights when it is set."""
    model = build_gpt_model(section, groups, device=device)
    if section.load:
        load_weights(model, section.load, groups)
    return model


def load_weights(model: torch.nn.Module, path: str | Path, groups: ParallelGroups) -> ModelConfig:
    """Copy this rank's part of the checkpoint at ``path`` into ``model`` (one GPTModel stage).

    ``path`` is a converted directory (``checkpoints_convert/hf_to_megatron.py``), its ``dist/``
    (used for a converted directory only when it has no safetensors), an HF directory
    (config.json + safetensors) or a training checkpoint (a save dir or one of its step dirs).
    Every rank of the model calls this. Returns the checkpoint's ModelConfig.
    """
    path = Path(path)
    kind = checkpoint_kind(path)
    cfg = read_checkpoint_config(path, kind=kind)
    check_model_matches(model, cfg, path)
    rows = _model_vocab_rows(model, groups)
    if rows is not None and rows < cfg.vocab_size:
        raise ValueError(f"{path}: the model's vocabulary ({rows} rows) is smaller than the checkpoint's "
                         f"vocab_size={cfg.vocab_size}")
    dist_path = dist_checkpoint_path(path, kind=kind)
    if dist_path is not None:
        load_checkpoint(directory=dist_path, model_chunks=[model], optimizer=None, scheduler=None, rng=False)
        return cfg
    per_stage = cfg.num_layers // groups.pp_size
    layers = range(groups.pp_rank * per_stage, (groups.pp_rank + 1) * per_stage)
    tensors, cfg = stage_tensors(path, layers, kind=kind)
    load_state(model, tensors, vocab_size=cfg.vocab_size, source=str(path))
    return cfg


def load_state(model: torch.nn.Module, full: dict[str, torch.Tensor], *, vocab_size: Optional[int] = None,
               source: str = "state dict") -> None:
    """Copy this rank's slices of full-layout (TP=1, PP=1) tensors into ``model``.

    ``full`` needs the globals and this stage's layers (global layer numbers); extra layers are
    ignored. ``vocab_size``: the true vocabulary; embedding/output rows past it load as zeros.
    """
    with torch.no_grad():
        for local_name, sharded in model.sharded_state_dict().items():
            pieces = sharded.build() if isinstance(sharded, ShardedTensorFactory) else [sharded]
            for piece in nested_values(pieces):
                if isinstance(piece, ShardedTensor):
                    _copy_slice(piece, _full_name(local_name, piece), full, vocab_size=vocab_size,
                                source=source)


def _full_name(local_name: str, sharded: ShardedTensor) -> str:
    """The full-layout name of the global tensor ``sharded`` is a slice of.

    The parameter's local name has the full layout's shape with stage-local numbers; megatron
    gives the global ones in order: those in the key (the layer of a heterogeneous block, e.g. MoE
    models), then the offsets of the prepended axes (the layer of a stacked block, the expert).
    A name without numbers (embedding, final norm, output layer) is its key: on the last stage the
    tied output layer's key is the embedding's.
    """
    parts = local_name.split(".")
    numbered = [i for i, p in enumerate(parts) if p.isdigit()]
    if not numbered:
        return sharded.key
    n = sharded.prepend_axis_num
    numbers = [p for p in sharded.key.split(".") if p.isdigit()] + [str(o) for o in sharded.global_offset[:n]]
    if len(numbers) != len(numbered):
        raise ValueError(f"{local_name}: expected {len(numbered)} global indices from the sharded key "
                         f"{sharded.key!r} and its {n} prepended axes, got {len(numbers)}")
    for i, number in zip(numbered, numbers):
        parts[i] = number
    # TE-spec models name the pre-norms after the linear layer they are fused into.
    return km.te_to_local_name(".".join(parts))


def _copy_slice(sharded: ShardedTensor, name: str, full: dict[str, torch.Tensor], *,
                vocab_size: Optional[int], source: str) -> None:
    if name not in full:
        raise ValueError(f"{source}: missing tensor {name!r} (model expects it for {sharded.key!r})")
    n = sharded.prepend_axis_num
    tensor = full[name]
    global_shape = tuple(sharded.global_shape[n:])
    if sharded.allow_shape_mismatch and tensor.shape[0] != global_shape[0]:
        # Vocabulary rows: megatron pads them per TP; rows past the true vocabulary are zero.
        rows = vocab_size if vocab_size is not None else min(tensor.shape[0], global_shape[0])
        tensor = pad_vocab(tensor[:rows], global_shape[0])
    if tuple(tensor.shape) != global_shape:
        raise ValueError(f"{source}: tensor {name!r}: expected shape {global_shape}, got {tuple(tensor.shape)}")
    index = tuple(slice(o, o + s) for o, s in zip(sharded.global_offset[n:], sharded.data.shape))
    sharded.data.copy_(tensor[index])


def _model_vocab_rows(model: torch.nn.Module, groups: ParallelGroups) -> Optional[int]:
    """The model's padded vocabulary (None on stages without embedding or output layer)."""
    own = model.state_dict()
    local_rows = next((own[n].shape[0] for n in (km.EMBED, km.OUTPUT) if n in own), None)
    return None if local_rows is None else local_rows * groups.tp_size


def check_model_matches(model: torch.nn.Module, cfg: ModelConfig, path: Path) -> None:
    """One line naming the first shape field where the built model and the checkpoint differ."""
    tc = model.config
    tied = bool(getattr(model, "share_embeddings_and_output_weights", False))
    pairs = {
        "num_layers": (tc.num_layers, cfg.num_layers),
        "hidden_size": (tc.hidden_size, cfg.hidden_size),
        "num_attention_heads": (tc.num_attention_heads, cfg.num_attention_heads),
        "num_query_groups": (tc.num_query_groups, cfg.num_query_groups),
        "ffn_hidden_size": (tc.ffn_hidden_size, cfg.ffn_hidden_size),
        "kv_channels": (tc.kv_channels, head_dim(cfg)),
        "add_qkv_bias": (bool(tc.add_qkv_bias), cfg.add_qkv_bias),
        "qk_layernorm": (bool(tc.qk_layernorm), cfg.qk_layernorm),
        "untie_embeddings_and_output_weights": (not tied, cfg.untie_embeddings_and_output_weights),
    }
    built = getattr(model, "model_config", None)
    if built is not None:  # built by build_gpt_model: the fields TransformerConfig does not show
        for key in ("rope_scaling", "rope_scaling_factor", "num_experts", "moe_router_topk", "moe_ffn_hidden_size",
                    "moe_layer_pattern", "moe_norm_topk_prob"):
            pairs[key] = (getattr(built, key), getattr(cfg, key))
    for key, (model_value, ckpt_value) in pairs.items():
        if model_value != ckpt_value:
            raise ValueError(f"{path}: {key}: the model was built with {model_value}, the checkpoint has "
                             f"{ckpt_value}")


def model_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Parameters (and buffers megatron persists) of one stage, detached on CPU."""
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items() if not k.endswith("._extra_state")}


# ---------------------------------------------------------------- dist checkpoints in one process


def read_dist_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], ModelConfig]:
    """Full-layout (TP=1, PP=1) tensors and ModelConfig of the dist checkpoint at ``path``.

    Loaded through a TP=1 model in a one-process world, so a checkpoint saved at any TP/PP works;
    the vocabulary comes back padded to ``make_vocab_size_divisible_by``.
    """
    cfg = dist_checkpoint_config(path)
    with single_process_world() as groups:
        model = build_gpt_model(ModelSection(model=cfg), groups, device=torch.device("cpu"))
        load_checkpoint(directory=path, model_chunks=[model], optimizer=None, scheduler=None, rng=False)
        tensors = model_state_dict(model)
        del model
    return tensors, cfg


def write_dist_weights(tensors: dict[str, torch.Tensor], cfg: ModelConfig, target: Path) -> None:
    """``target/step_0000000``: full-layout ``tensors`` as a model-only dist checkpoint.

    The ModelConfig travels in extra_state.json (``MODEL_CONFIG_KEY``), so the checkpoint loads
    with no other file beside it.
    """
    # The tensors may be padded for another TP; a TP=1 model pads to a multiple of
    # make_vocab_size_divisible_by, so use the padded row count itself to keep the same rows.
    padded = tensors[km.EMBED].shape[0]
    build_cfg = dataclasses.replace(cfg, make_vocab_size_divisible_by=padded)
    with single_process_world() as groups:
        model = build_gpt_model(ModelSection(model=build_cfg), groups, device=torch.device("cpu"))
        load_state(model, tensors, vocab_size=cfg.vocab_size, source=str(target))
        extra = {MODEL_CONFIG_KEY: dataclasses.asdict(cfg), "padded_vocab_size": padded}
        save_checkpoint(directory=target, step=0, model_chunks=[model], optimizer=None, scheduler=None,
                        extra_state=extra, config=None, rng=False)
        del model
