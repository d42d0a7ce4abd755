"""The per-rank file layout (``mp_rank_{tp:02d}_{pp:03d}/``): full (TP=1, PP=1) state dicts <-> shards.

Only the converter's ``--rank-layout`` output and its reading use this; live models take their
shard from megatron-core's own ``sharded_state_dict`` (:mod:`rlad_megatron.models.weights`).
The full layout has one name per tensor, layer indices global. A shard holds local names
(``decoder.layers.{i}`` counted from 0 within its pipeline stage) and TP slices:

    column-parallel (split rows):  word_embeddings, output_layer, linear_qkv (weight, bias)
    SwiGLU fc1 (split gate and up separately, then concat): linear_fc1.weight
    row-parallel (split columns):  linear_proj.weight, linear_fc2.weight
    replicated:                    norms, q/k layernorms

Fused QKV is grouped per query group in megatron-core, so a contiguous row split gives each TP
rank whole groups (``num_query_groups % tp == 0`` is validated in the config).
"""

from __future__ import annotations

import re

import torch

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_ROW_SPLIT = ("word_embeddings.weight", "output_layer.weight", "linear_qkv.weight", "linear_qkv.bias")
_COL_SPLIT = ("linear_proj.weight", "linear_fc2.weight")
_SWIGLU = ("linear_fc1.weight",)
_EMBED = "embedding.word_embeddings.weight"
_OUTPUT = "output_layer.weight"


def _tp_rule(name: str) -> str:
    if name.endswith(_SWIGLU):
        return "swiglu"
    if name.endswith(_ROW_SPLIT):
        return "row"
    if name.endswith(_COL_SPLIT):
        return "col"
    return "replicated"


def _is_stage_param(name: str, *, first: bool, last: bool) -> bool:
    if name.startswith("embedding."):
        return first
    if name.startswith("output_layer.") or name.startswith("decoder.final_layernorm."):
        return last
    return True


def _skip(name: str) -> bool:
    # Transformer Engine / megatron keep extra state entries that are not parameters.
    return name.endswith("._extra_state")


def shard_state_dict(full: dict[str, torch.Tensor], *, tp_rank: int, tp_size: int, pp_rank: int,
                     pp_size: int, num_layers: int, tied_embeddings: bool = False) -> dict[str, torch.Tensor]:
    """The slice of ``full`` that rank (tp_rank, pp_rank) holds, under local names."""
    per_stage = num_layers // pp_size
    lo, hi = pp_rank * per_stage, (pp_rank + 1) * per_stage
    first, last = pp_rank == 0, pp_rank == pp_size - 1
    out: dict[str, torch.Tensor] = {}
    for name, tensor in full.items():
        if _skip(name):
            continue
        m = _LAYER.match(name)
        if m:
            idx = int(m.group(1))
            if not lo <= idx < hi:
                continue
            local = f"decoder.layers.{idx - lo}.{m.group(2)}"
        else:
            local = name
            if not _is_stage_param(name, first=first, last=last):
                # With tied embeddings a last stage that is not also the first holds its own
                # copy of the embedding as output_layer.weight (megatron-core's layout).
                if not (tied_embeddings and last and name == _EMBED):
                    continue
                local = _OUTPUT
        rule = _tp_rule(name)
        if rule == "row":
            piece = tensor.chunk(tp_size, dim=0)[tp_rank]
        elif rule == "col":
            piece = tensor.chunk(tp_size, dim=1)[tp_rank]
        elif rule == "swiglu":
            gate, up = tensor.chunk(2, dim=0)
            piece = torch.cat([gate.chunk(tp_size, dim=0)[tp_rank], up.chunk(tp_size, dim=0)[tp_rank]])
        else:
            piece = tensor
        out[local] = piece.clone()
    return out


def unshard_state_dicts(shards: dict[tuple[int, int], dict[str, torch.Tensor]], *, tp_size: int,
                        pp_size: int, num_layers: int,
                        tied_embeddings: bool = False) -> dict[str, torch.Tensor]:
    """Inverse of :func:`shard_state_dict`; ``shards[(tp_rank, pp_rank)]`` -> full dict."""
    per_stage = num_layers // pp_size
    full: dict[str, torch.Tensor] = {}
    for pp_rank in range(pp_size):
        names = [n for n in shards[(0, pp_rank)] if not _skip(n)]
        for local in names:
            m = _LAYER.match(local)
            name = (f"decoder.layers.{int(m.group(1)) + pp_rank * per_stage}.{m.group(2)}" if m else local)
            if tied_embeddings and pp_size > 1 and pp_rank == pp_size - 1 and name == _OUTPUT:
                continue  # the last stage's copy of the tied embedding
            pieces = [shards[(t, pp_rank)][local] for t in range(tp_size)]
            rule = _tp_rule(name)
            if rule == "row":
                full[name] = torch.cat(pieces, dim=0)
            elif rule == "col":
                full[name] = torch.cat(pieces, dim=1)
            elif rule == "swiglu":
                halves = [p.chunk(2, dim=0) for p in pieces]
                full[name] = torch.cat([h[0] for h in halves] + [h[1] for h in halves], dim=0)
            else:
                full[name] = pieces[0]
    return full
