"""megatron-core DDP wrapping, Adam optimizer and LR schedule from our ``OptimizerConfig``.

    model = wrap_ddp(build_gpt_model(...), use_distributed_optimizer=False)
    optimizer, scheduler = build_optimizer([model], cfg.optimizer, use_distributed_optimizer=False,
                                           total_steps=cfg.train.steps)
    # per step: model.zero_grad_buffer(); optimizer.zero_grad(); <fwd/bwd>;
    #           ok, grad_norm, _ = optimizer.step(); scheduler.step(increment=1)

Adam with global-norm gradient clipping (``clip_grad``; 0 disables it), linear warmup over
``warmup_steps`` and then ``decay_style`` decay to ``min_lr`` at ``total_steps``. On CPU
(no Transformer Engine/apex) megatron-core falls back to ``torch.optim.AdamW``.
"""

from __future__ import annotations

import torch
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig as MegatronOptimizerConfig
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from rlad_megatron.config import OptimizerConfig


def wrap_ddp(model: torch.nn.Module, *, use_distributed_optimizer: bool,
             pg_collection=None) -> DistributedDataParallel:
    """megatron-core DDP around one model chunk (grads reduced in fp32 into contiguous buffers).

    ``pg_collection``: the model's ``ParallelGroups.collection``; ``None`` uses megatron's grid.
    """
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=use_distributed_optimizer,
    )
    return DistributedDataParallel(config=model.config, ddp_config=ddp_config, module=model,
                                   pg_collection=pg_collection)


def _megatron_config(opt_cfg: OptimizerConfig, *, params_dtype: torch.dtype,
                     use_distributed_optimizer: bool) -> MegatronOptimizerConfig:
    return MegatronOptimizerConfig(
        optimizer="adam",
        lr=opt_cfg.lr,
        min_lr=opt_cfg.min_lr,
        weight_decay=opt_cfg.weight_decay,
        adam_beta1=opt_cfg.adam_beta1,
        adam_beta2=opt_cfg.adam_beta2,
        adam_eps=opt_cfg.adam_eps,
        clip_grad=opt_cfg.clip_grad,
        bf16=params_dtype is torch.bfloat16,
        fp16=params_dtype is torch.float16,
        params_dtype=params_dtype,
        use_distributed_optimizer=use_distributed_optimizer,
    )


def build_optimizer(model_chunks: list[torch.nn.Module], opt_cfg: OptimizerConfig, *,
                    use_distributed_optimizer: bool, total_steps: int,
                    pg_collection=None) -> tuple[object, OptimizerParamScheduler]:
    """(megatron optimizer, ``OptimizerParamScheduler``) for DDP-wrapped ``model_chunks``.

    The scheduler counts optimizer steps: call ``scheduler.step(increment=1)`` after each
    ``optimizer.step()``. ``total_steps`` is where the decay reaches ``min_lr``.
    """
    if not model_chunks:
        raise ValueError("build_optimizer: expected at least one model chunk, got an empty list")
    for i, chunk in enumerate(model_chunks):
        if not isinstance(chunk, DistributedDataParallel):
            raise ValueError(f"build_optimizer: model_chunks[{i}] must be wrapped with wrap_ddp, "
                             f"got {type(chunk).__name__}")
        if chunk.ddp_config.use_distributed_optimizer != use_distributed_optimizer:
            raise ValueError(
                f"build_optimizer: use_distributed_optimizer={use_distributed_optimizer} but "
                f"model_chunks[{i}] was wrapped with "
                f"use_distributed_optimizer={chunk.ddp_config.use_distributed_optimizer}")
    if total_steps <= opt_cfg.warmup_steps:
        raise ValueError(f"optimizer.warmup_steps: expected fewer than the {total_steps} total steps, "
                         f"got {opt_cfg.warmup_steps}")
    params_dtype = model_chunks[0].config.params_dtype
    config = _megatron_config(opt_cfg, params_dtype=params_dtype,
                              use_distributed_optimizer=use_distributed_optimizer)
    # megatron-core refuses its extra gloo DP groups together with an explicit pg_collection.
    optimizer = get_megatron_optimizer(config, model_chunks, pg_collection=pg_collection,
                                       use_gloo_process_groups=pg_collection is None)
    scheduler = OptimizerParamScheduler(
        optimizer,
        # Warmup starts from 0 like Megatron-LM's default --lr-warmup-init.
        init_lr=0.0,
        max_lr=opt_cfg.lr,
        min_lr=opt_cfg.min_lr,
        lr_warmup_steps=opt_cfg.warmup_steps,
        lr_decay_steps=total_steps,
        lr_decay_style=opt_cfg.decay_style,
        start_wd=opt_cfg.weight_decay,
        end_wd=opt_cfg.weight_decay,
        wd_incr_steps=total_steps,
        wd_incr_style="constant",
    )
    return optimizer, scheduler
