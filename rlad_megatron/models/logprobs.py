"""The final hidden states of a megatron-core ``GPTModel`` stage and its output-layer weight shard, for
log-probs computed in chunks (:func:`rlad_megatron.losses.chunked_linear_logprobs`).

Legend: S positions, B sequences, H hidden size, V/TP the local vocabulary shard.

megatron-core 0.16's ``GPTModel.forward`` has no flag that returns hidden states on the last stage,
but its ``_postprocess`` returns the decoder's output (after the final norm, which belongs to the
``TransformerBlock``) whenever the model's ``post_process`` is False, as on every stage but the
last. :func:`final_hidden_states` runs the public forward with that attribute off for the duration
of the call; the output layer (a ``ColumnParallelLinear`` without bias, its weight the tied
embedding's when ``share_embeddings_and_output_weights``) is then applied by the caller, chunk by
chunk. Multi-token prediction and sequence parallelism change what ``_postprocess`` does to the
hidden states and are refused.
"""

from __future__ import annotations

import torch


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel under megatron's DDP (and any other ``.module`` wrapper)."""
    while hasattr(model, "module"):
        model = model.module
    return model


def check_chunkable(model: torch.nn.Module) -> None:
    """Raise ValueError when this stage's output layer cannot be applied by chunks of positions."""
    gpt = unwrap(model)
    if getattr(gpt.config, "mtp_num_layers", None):
        raise ValueError(f"rl.logprob_chunk_size: multi-token prediction (mtp_num_layers="
                         f"{gpt.config.mtp_num_layers}) needs the materialised logits (set it to 0)")
    if gpt.post_process and (gpt.output_layer.sequence_parallel or gpt.output_layer.bias is not None):
        raise ValueError("rl.logprob_chunk_size: the output layer uses sequence parallelism or a bias; "
                         "chunked log-probs support neither (set rl.logprob_chunk_size=0)")


def output_weight(model: torch.nn.Module) -> torch.Tensor:
    """``[V/TP, H]`` this last stage's output-layer weight shard (the embedding's when tied)."""
    gpt = unwrap(model)
    if not gpt.post_process:
        raise ValueError("output_weight: only the last pipeline stage has the output layer")
    if gpt.share_embeddings_and_output_weights:
        return gpt.shared_embedding_or_output_weight()
    return gpt.output_layer.weight


def final_hidden_states(stage: torch.nn.Module, tokens_BS: torch.Tensor, position_ids_BS: torch.Tensor
                        ) -> torch.Tensor:
    """``[S, B, H]`` this stage's output without the output layer (on the last stage: the final hidden
    states; elsewhere what the stage sends to the next one)."""
    gpt = unwrap(stage)
    post = gpt.post_process
    gpt.post_process = False
    try:
        return stage(tokens_BS, position_ids_BS, None)
    finally:
        gpt.post_process = post
