"""A decode step with fixed shapes over a cohort's KV buffers, sampling included, captured as a CUDA graph on GPU.

Shape legend: b = rows of the cohort (its batch-size bucket), Lc = the cohort's cache length,
g = query groups on this TP rank, n = attention heads on this TP rank, d = head dim,
H = hidden size, V = megatron's padded vocabulary.

Why not megatron's own decode: its static path slices the cache to ``[:sequence_len_offset + 1]``
and takes the offset as a Python int, so every step has new shapes and cannot be replayed; its
static CUDA-graph path requires ``flash_decode`` (the flash-attn package), and its dynamic engine
requires flash-attn >= 2.7.3 and CUDA (docs/rollout.md). Here each step writes K/V at ``pos`` (a
device tensor) into the full-length buffers megatron allocated during prefill, and attends over all
``Lc`` slots with a mask ``slot <= pos``: the same math as megatron's step, with shapes that only
change when the cohort is compacted. On CUDA the step is captured once per (cohort, batch size)
and replayed; on CPU it runs eagerly (what the CPU tests check against megatron's path).

Keys are cached rotated. Megatron caches them without RoPE and rotates the whole cached prefix in
every layer at every step: at 64 rows x 384 slots that is several passes over each layer's keys,
more bytes than the layer's weights. Rotation is elementwise per slot, so rotating each key once
(the prefill's keys when the cohort enters decode, each new key as it is written) gives the same
bits as rotating them again at every step, and a step reads each cached K/V entry once.

The body calls the model's own submodules (norms, fused QKV, MLP, output layer with its TP
gather), so it is written for the local and the Transformer Engine specs (only the local spec is
tested: no TE in the CPU venv, and no GPU run yet). Supported: PP = 1, RoPE, no
attention output gate, no MoE; :func:`check_supported` says why otherwise.
"""

from __future__ import annotations

import time

import torch
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

from rlad_megatron.rl.sampling import Sampler


def check_supported(model, groups) -> str | None:
    """None when the graphed step can run this model, else the reason it cannot."""
    config = model.config
    if groups.pp_size > 1:
        return "pipeline_model_parallel_size > 1 (the step has no stage-to-stage exchange)"
    if getattr(model, "position_embedding_type", "rope") != "rope":
        return f"position_embedding_type={model.position_embedding_type} (the step applies RoPE)"
    if getattr(config, "attention_output_gate", False) or getattr(config, "num_moe_experts", None):
        return "attention_output_gate or MoE layers"
    return None


class DecodeSteps:
    """Fixed-shape decode steps, sampling included, for every cohort of one generate() call.

    Sampling is part of the step (and of its graph): it is fixed-shape and sync-free, and eager it
    would launch more kernels per step than the graph replay (the seeded hash alone is ~150 ops).
    Every cohort row is sampled; the caller keeps the rows that are sampling at this position.
    """

    def __init__(self, model, *, capture: bool, sample: Sampler):
        self.model, self.capture, self.sample = model, capture, sample
        self._graphs: dict[int, _Graph] = {}  # id(context) -> the graph of its current buffers
        # id(context) -> its RoPE frequencies, once its cache is zeroed past the prefill and rotated.
        self._freqs: dict[int, torch.Tensor] = {}
        self.captures = 0
        self.capture_s = 0.0  # wall time of the steps that captured (warm-up, capture and first replay)

    def step(self, context: StaticInferenceContext, ids_b1: torch.Tensor, pos: int,
             seeds_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed ``ids_b1``, the tokens at position ``pos`` (the cache holds ``[0, pos)``); return each
        row's token for position ``pos + 1``, drawn from its stream ``seeds_b`` at that position, and
        its log-prob, both ``[b]``. Advances the context by one."""
        memory = context.key_value_memory_dict
        pos_1 = torch.full((1,), pos, dtype=torch.long, device=ids_b1.device)
        freqs_L11d = self._freqs.get(id(context))
        if freqs_L11d is None:
            freqs_L11d = self._freqs[id(context)] = _rope(self.model, context)
            _prepare_cache(self.model, memory, pos, freqs_L11d)
        if not self.capture:
            out = _step_body(self.model, self.sample, memory, ids_b1, pos_1, seeds_b, freqs_L11d)
        else:
            graph = self._graphs.get(id(context))
            if graph is None or not graph.matches(memory):
                self._graphs.pop(id(context), None)  # free the old graph's pool before capturing
                torch.cuda.synchronize()
                start = time.perf_counter()
                graph = self._graphs[id(context)] = _Graph(self.model, self.sample, memory, ids_b1, pos_1, seeds_b,
                                                           freqs_L11d)
                out = graph.replay(ids_b1, pos_1, seeds_b)
                torch.cuda.synchronize()
                self.capture_s += time.perf_counter() - start
                self.captures += 1
            else:
                out = graph.replay(ids_b1, pos_1, seeds_b)
        context.increment_sequence_len_offset(1)
        return out

    def release(self, context: StaticInferenceContext) -> None:
        self._graphs.pop(id(context), None)
        self._freqs.pop(id(context), None)


def _rope(model, context: StaticInferenceContext) -> torch.Tensor:
    """RoPE frequencies ``[Lc, 1, 1, d]`` for the cohort's whole cache (what megatron's prefill built)."""
    return model.rotary_pos_emb(context.max_sequence_length)


def _prepare_cache(model, memory: dict, pos: int, freqs_L11d: torch.Tensor) -> None:
    """Zero the slots from ``pos`` on and rotate the prefill's keys ``[0, pos)`` in place.

    Megatron allocates the cache with torch.empty: a masked slot still multiplies its value by a
    zero weight, and a NaN there would poison the row. Compaction copies the zeros and the rotation.
    """
    for key_Lbgd, value_Lbgd in memory.values():
        key_Lbgd[pos:].zero_()
        value_Lbgd[pos:].zero_()
        key_Lbgd[:pos] = _rotate(model, key_Lbgd[:pos], freqs_L11d[:pos])


def _rotate(model, x_sbhd: torch.Tensor, freqs_s11d: torch.Tensor) -> torch.Tensor:
    cp_group = getattr(getattr(model.decoder.layers[0].self_attention, "pg_collection", None), "cp", None)
    return apply_rotary_pos_emb(x_sbhd, freqs_s11d, config=model.config, cp_group=cp_group)


def _step_body(model, sample: Sampler, memory: dict, ids_b1: torch.Tensor, pos_1: torch.Tensor,
               seeds_b: torch.Tensor, freqs_L11d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    logits_bV = _decode_body(model, memory, ids_b1, pos_1, freqs_L11d)
    return sample(logits_bV, seeds_b, (pos_1 + 1).expand(seeds_b.shape[0]))


def _decode_body(model, memory: dict, ids_b1: torch.Tensor, pos_1: torch.Tensor,
                 freqs_L11d: torch.Tensor) -> torch.Tensor:
    config = model.config
    positions_b1 = pos_1.expand_as(ids_b1)
    hidden_1bH = model.embedding(input_ids=ids_b1, position_ids=positions_b1)
    slots_L = torch.arange(freqs_L11d.shape[0], device=ids_b1.device)
    attend_111L = (slots_L <= pos_1).view(1, 1, 1, -1)  # True = attend; broadcast over [b, g, n / g, Lc]
    freqs_q_111d = freqs_L11d.index_select(0, pos_1)
    for layer in model.decoder.layers:
        attn = layer.self_attention
        residual_1bH = hidden_1bH
        query_1bnd, key_1bgd, value_1bgd = attn.get_query_key_value_tensors(layer.input_layernorm(hidden_1bH), None)
        key_Lbgd, value_Lbgd = memory[layer.layer_number]
        # One rotation for the query and the new key (same position): half the elementwise kernels.
        heads = query_1bnd.shape[2]
        rotated_1bhd = _rotate(model, torch.cat([query_1bnd, key_1bgd], dim=2), freqs_q_111d)
        query_1bnd = rotated_1bhd[:, :, :heads]
        key_Lbgd.index_copy_(0, pos_1, rotated_1bhd[:, :, heads:])
        value_Lbgd.index_copy_(0, pos_1, value_1bgd)
        ctx_1bD = _attend(query_1bnd[0], key_Lbgd, value_Lbgd, attend_111L,
                          scale=getattr(attn.core_attention, "softmax_scale", None) or config.softmax_scale)
        out_1bH, bias = attn.linear_proj(ctx_1bD)
        hidden_1bH = residual_1bH + (out_1bH if bias is None else out_1bH + bias)
        out_1bH, bias = layer.mlp(layer.pre_mlp_layernorm(hidden_1bH))
        hidden_1bH = hidden_1bH + (out_1bH if bias is None else out_1bH + bias)
    if model.decoder.final_layernorm is not None:
        hidden_1bH = model.decoder.final_layernorm(hidden_1bH)
    weight = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights else None
    logits_1bV, _ = model.output_layer(hidden_1bH, weight=weight, runtime_gather_output=True)
    return logits_1bV[0]


def _attend(query_bnd: torch.Tensor, keys_Lbgd: torch.Tensor, value_Lbgd: torch.Tensor, attend_111L: torch.Tensor,
            *, scale: float | None) -> torch.Tensor:
    """One query per row against every cache slot, grouped-query: ``[1, b, n * d]``.

    Query head ``i`` reads K/V group ``i // (n / g)``, as megatron's ``repeat_interleave``, but as a
    batched matmul per group, so K/V are read once instead of copied n / g times. Softmax in float32.
    """
    rows, heads, dim = query_bnd.shape
    groups = keys_Lbgd.shape[2]
    q_bghd = query_bnd.view(rows, groups, heads // groups, dim)
    scores_bghL = torch.matmul(q_bghd, keys_Lbgd.permute(1, 2, 3, 0)).float()
    scores_bghL = scores_bghL * (scale if scale is not None else dim ** -0.5)
    probs_bghL = torch.softmax(scores_bghL.masked_fill(~attend_111L, float("-inf")), dim=-1)
    ctx_bghd = torch.matmul(probs_bghL.to(value_Lbgd.dtype), value_Lbgd.permute(1, 2, 0, 3))
    return ctx_bghd.reshape(1, rows, heads * dim)


class _Graph:
    """One captured step: static input buffers, the graph, and its output buffers."""

    def __init__(self, model, sample: Sampler, memory: dict, ids_b1: torch.Tensor, pos_1: torch.Tensor,
                 seeds_b: torch.Tensor, freqs_L11d: torch.Tensor):
        self.buffers = {layer: key.data_ptr() for layer, (key, _) in memory.items()}
        self.ids_b1, self.pos_1, self.seeds_b = ids_b1.clone(), pos_1.clone(), seeds_b.clone()
        self.freqs_L11d = freqs_L11d  # read by every replay: held as long as the graph
        args = (model, sample, memory, self.ids_b1, self.pos_1, self.seeds_b, freqs_L11d)
        # One warm-up on a side stream (allocator growth, lazy initialisation), then capture. Both write
        # this step's K/V at pos, the same values the replay writes, so the extra run changes nothing.
        # One, not torch's usual three: a generate() call captures once per cohort and bucket (the
        # graphs live with the cohort's KV buffers), so each warm-up is an eager step per capture.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            _step_body(*args)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        # thread_local, as megatron's own graph capture: other threads' CUDA calls (the NCCL watchdog's
        # event queries) must not invalidate this thread's capture.
        with torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
            self.tokens_b, self.lp_b = _step_body(*args)

    def matches(self, memory: dict) -> bool:
        return all(memory[layer][0].data_ptr() == ptr for layer, ptr in self.buffers.items())

    def replay(self, ids_b1: torch.Tensor, pos_1: torch.Tensor,
               seeds_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.ids_b1.copy_(ids_b1)
        self.pos_1.copy_(pos_1)
        self.seeds_b.copy_(seeds_b)
        self.graph.replay()
        return self.tokens_b.clone(), self.lp_b.clone()  # the next replay overwrites the output buffers
