"""Resumable distributed checkpoints with megatron-core ``dist_checkpointing`` (torch_dist format).

    save_checkpoint(directory=cfg.checkpoint.save_dir, step=step, model_chunks=model,
                    optimizer=optimizer, scheduler=scheduler, extra_state={"step": step, ...},
                    config=cfg, keep_last=cfg.checkpoint.keep_last)
    extra = load_checkpoint(directory=cfg.checkpoint.save_dir, model_chunks=model,
                            optimizer=optimizer, scheduler=scheduler)

One checkpoint directory holds the model and optimizer as sharded tensors (any TP/PP layout can
load the model: dist_checkpointing reshards), the scheduler in megatron's common state,
``extra_state.json`` and ``config.yaml`` (rank 0), ``meta.json`` (layout; written last) and
``rng/rank_XXXXX.pt`` per rank. See ``files.py`` for the atomic publish protocol.

Optimizer state: the non-distributed megatron optimizer stores Adam moments as sharded tensors
keyed like the model, so it reshards across TP/PP/DP too. The distributed optimizer uses
megatron's ``dp_reshardable`` format, which resumes at the same TP/PP (DP may change).
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor, apply_factories
from megatron.core.utils import unwrap_model
from torch.distributed.checkpoint.api import CheckpointException

from rlad_megatron.checkpointing import files
from rlad_megatron.checkpointing.rng import load_rng_state, save_rng_state
from rlad_megatron.config import save_config
from rlad_megatron.distributed.compat import write_buckets_in_process
from rlad_megatron.distributed.groups import current_groups
from rlad_megatron.models.builder import true_vocab_size

FORMAT_VERSION = 1
# megatron-core 0.16's default 'fully_sharded_model_space' builds ShardedTensors with
# flattened_range, which its own validation now rejects; 'dp_reshardable' is Megatron-LM's
# default. ('fully_reshardable' fails on load with torch's Adam: it drops the per-param 'step'.)
DISTRIB_OPTIM_SHARDING = "dp_reshardable"


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _all_ok(ok: bool) -> bool:
    """True on every rank iff ``ok`` on every rank, so a failure on one rank fails them all."""
    if not dist.is_initialized():
        return ok
    # NCCL reduces only CUDA tensors (gloo takes CPU ones).
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    flag = torch.tensor([0 if ok else 1], dtype=torch.int64, device=device)
    dist.all_reduce(flag)
    return int(flag.item()) == 0


def _layout() -> dict:
    g = current_groups()
    return {"world_size": _world(), "tp": g.tp_size, "pp": g.pp_size, "dp": g.dp_size}


def _uses_distributed_optimizer(model_chunks) -> bool:
    ddp_config = getattr(model_chunks[0], "ddp_config", None)
    return bool(ddp_config is not None and ddp_config.use_distributed_optimizer)


def _model_sharded_state_dict(model_chunks) -> dict:
    # Megatron-LM's key convention: "model" for one chunk, "model0", "model1", ... for
    # virtual pipeline chunks.
    modules = unwrap_model(list(model_chunks))
    if len(modules) == 1:
        return {"model": modules[0].sharded_state_dict()}
    return {f"model{i}": m.sharded_state_dict() for i, m in enumerate(modules)}


def _sharded_state_dict(model_chunks, optimizer, scheduler, *, is_loading: bool) -> dict:
    state = _model_sharded_state_dict(model_chunks)
    if optimizer is not None:
        metadata = {"distrib_optim_sharding_type": DISTRIB_OPTIM_SHARDING}
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=is_loading, metadata=metadata)
    if scheduler is not None:
        state["opt_param_scheduler"] = scheduler.state_dict()
    return state


def _materialize_distributed_optimizer_state(optimizer) -> None:
    """Give a fresh DistributedOptimizer its lazily created Adam state before a load.

    With torch's Adam (no TE/apex) ``DistributedOptimizer.state_dict`` reads the per-param
    ``step`` from the state and asserts it exists, so a never-stepped optimizer cannot build
    its load template. megatron-core's own helper takes one zero-grad step to create the state
    (the values are overwritten by the load).
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        if isinstance(opt, DistributedOptimizer) and len(opt.optimizer.state) == 0:
            opt._init_optimizer_states_with_dummy_values()


def _restore_adam_steps(optimizer, loaded_state) -> None:
    """Per-param Adam ``step`` tensors of a distributed optimizer from the loaded param groups.

    With torch's Adam (no TE/apex) megatron-core 0.16 loses the per-param step on load: the
    ``dp_reshardable`` param state keeps the template's value, and
    ``DistributedOptimizer.load_state_dict`` assigns ONE shared step tensor to every param
    (torch's Adam increments it in place, once per param). The step count itself is saved in
    the common ``param_groups``; give each param its own copy of it.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    opts = getattr(optimizer, "chained_optimizers", [optimizer])
    states = [loaded_state] if len(opts) == 1 else [loaded_state[i] for i in range(len(opts))]
    for opt, state in zip(opts, states):
        if not isinstance(opt, DistributedOptimizer) or "optimizer" not in state:
            continue
        for group, saved_group in zip(opt.optimizer.param_groups, state["optimizer"]["param_groups"]):
            if saved_group.get("step") is None:
                continue
            for p in group["params"]:
                param_state = opt.optimizer.state.get(p)
                if param_state and isinstance(param_state.get("step"), torch.Tensor):
                    old = param_state["step"]
                    param_state["step"] = torch.tensor(float(saved_group["step"]), dtype=old.dtype,
                                                       device=old.device)


def _check_psutil() -> None:
    # megatron-core's torch_dist writer (filesystem_async.write_preloaded_data) calls psutil in
    # a forked worker *outside* its try block; without psutil the worker dies and the parent
    # waits forever on its JoinableQueue (a hang, not an error).
    from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync

    if FileSystemWriterAsync.write_preloaded_data_multiproc is write_buckets_in_process:
        return  # the CPU compat shim writes in-process
    if importlib.util.find_spec("psutil") is None:
        raise ImportError("saving a megatron dist checkpoint needs psutil (pip install psutil); "
                          "without it megatron-core's torch_dist writer hangs")


def save_checkpoint(*, directory: str | Path, step: int, model_chunks: list, optimizer=None, scheduler=None,
                    extra_state: dict | None = None, config=None, rng: bool = True,
                    keep_last: int = 2) -> Path:
    """Save a complete checkpoint to ``directory/step_XXXXXXX`` atomically (all ranks call this).

    ``extra_state`` (JSON-able; rank 0's copy is saved, so it must agree across ranks) comes
    back from :func:`load_checkpoint`. ``config``: the resolved ``Config``, saved as config.yaml.
    ``keep_last``: complete checkpoints to keep (<= 0 keeps all). Returns the final directory.

    The entry point must be import-safe (``if __name__ == "__main__":``): megatron-core's
    writer starts a ``multiprocessing`` manager with the spawn method, which re-imports
    ``__main__``.
    """
    if not model_chunks:
        raise ValueError("save_checkpoint: expected at least one model chunk, got an empty list")
    _check_psutil()
    rank = _rank()
    save_dir = Path(directory)
    tmp = save_dir / f"{files.TMP_PREFIX}{files.step_dir_name(step)}"
    if rank == 0:
        files.prepare_tmp_dir(save_dir, step)
    _barrier()

    state = _sharded_state_dict(model_chunks, optimizer, scheduler, is_loading=False)
    dist_checkpointing.save(state, str(tmp), validate_access_integrity=True)
    if rng:
        save_rng_state(tmp, rank)
    if rank == 0:
        files.write_json_atomic(tmp / "extra_state.json", dict(extra_state or {}))
        if config is not None:
            save_config(config, tmp)
    # meta.json marks the tmp dir as fully written; it goes in after every rank's files.
    _barrier()
    if rank == 0:
        meta = {"format_version": FORMAT_VERSION, "step": step, "rng": rng,
                "has_optimizer": optimizer is not None, "has_scheduler": scheduler is not None,
                "distributed_optimizer": _uses_distributed_optimizer(model_chunks),
                "distrib_optim_sharding_type": DISTRIB_OPTIM_SHARDING,
                "vocab_size": true_vocab_size(model_chunks[0]), **_layout()}
        files.write_json_atomic(tmp / files.META, meta)
        files.publish(tmp, keep_last=keep_last)
    _barrier()
    return save_dir / files.step_dir_name(step)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _check_tensors_match(path: Path, template: dict) -> None:
    """One-line ValueError naming the first tensor missing from, or shaped differently in, ``path``."""
    try:
        saved = dist_checkpointing.load_tensors_metadata(str(path))
    except Exception as e:  # noqa: BLE001 - any reader failure means an unreadable checkpoint
        raise ValueError(f"{path}: corrupt checkpoint, cannot read tensor metadata ({_first_line(e)})") from None
    apply_factories(template)
    for sh in nested_values(template):
        if not isinstance(sh, ShardedTensor):
            continue
        if sh.key not in saved:
            raise ValueError(f"{path}: tensor {sh.key!r} is not in the checkpoint (saved from another model "
                             f"or optimizer layout?)")
        got = tuple(saved[sh.key].global_shape)
        if got != tuple(sh.global_shape) and not sh.allow_shape_mismatch:
            raise ValueError(f"{path}: tensor {sh.key!r} has shape {got} in the checkpoint, this model "
                             f"expects {tuple(sh.global_shape)}")


def load_checkpoint(*, directory: str | Path, model_chunks: list, optimizer=None, scheduler=None,
                    rng: bool = True) -> dict:
    """Load the checkpoint at ``directory`` (a step dir, or a save dir: its newest complete one).

    Restores the model (at any TP/PP layout), and when given the optimizer, scheduler and this
    rank's RNG states (RNG only at the saved world size/TP/PP). Returns the saved extra_state.
    """
    if not model_chunks:
        raise ValueError("load_checkpoint: expected at least one model chunk, got an empty list")
    path = files.resolve_checkpoint(directory)
    meta = files.read_json(path / files.META)
    extra_state = files.read_json(path / "extra_state.json")
    layout = _layout()
    if optimizer is not None:
        if not meta.get("has_optimizer"):
            raise ValueError(f"{path}: has no optimizer state; pass optimizer=None to load the model only")
        if meta.get("distributed_optimizer") != _uses_distributed_optimizer(model_chunks):
            raise ValueError(f"{path}: saved with distributed_optimizer={meta.get('distributed_optimizer')}, "
                             f"loading with {_uses_distributed_optimizer(model_chunks)}")
        if meta.get("distributed_optimizer") and (meta["tp"], meta["pp"]) != (layout["tp"], layout["pp"]):
            raise ValueError(f"{path}: distributed-optimizer state was saved at TP={meta['tp']} PP={meta['pp']} "
                             f"and reshards only over DP; now TP={layout['tp']} PP={layout['pp']} "
                             f"(pass optimizer=None to load the model only)")
    if scheduler is not None and not meta.get("has_scheduler"):
        raise ValueError(f"{path}: has no scheduler state; pass scheduler=None")
    # megatron loads embedding rows with allow_shape_mismatch (vocabulary padding differs per TP),
    # so only the recorded true vocabulary tells a checkpoint of another tokenizer apart.
    saved_vocab, vocab = meta.get("vocab_size"), true_vocab_size(model_chunks[0])
    if saved_vocab is not None and vocab is not None and saved_vocab != vocab:
        raise ValueError(f"{path}: the embedding was saved for vocab_size={saved_vocab}, this model has "
                         f"vocab_size={vocab}")

    if optimizer is not None:
        _materialize_distributed_optimizer_state(optimizer)
    # Shape/key check on every rank before any collective read, so all ranks fail together.
    error = None
    try:
        _check_tensors_match(path, _sharded_state_dict(model_chunks, optimizer, scheduler, is_loading=True))
    except ValueError as e:
        error = e
    if not _all_ok(error is None):
        raise error or ValueError(f"{path}: another rank found a mismatched tensor (see its error)")

    state = _sharded_state_dict(model_chunks, optimizer, scheduler, is_loading=True)
    error = None
    try:
        loaded = dist_checkpointing.load(state, str(path), validate_access_integrity=True)
    # torch's CheckpointException (what a truncated file raises) derives from BaseException.
    except (Exception, CheckpointException) as e:  # noqa: BLE001 - reader errors become one line
        error = ValueError(f"{path}: corrupt or truncated checkpoint ({_first_line(e)})")
    if not _all_ok(error is None):
        raise error or ValueError(f"{path}: another rank failed to read the checkpoint (see its error)")

    modules = unwrap_model(list(model_chunks))
    keys = ["model"] if len(modules) == 1 else [f"model{i}" for i in range(len(modules))]
    for module, key in zip(modules, keys):
        module.load_state_dict(loaded[key], strict=True)
    if optimizer is not None:
        # The distributed optimizer copies into leaf main params (views of the model params).
        with torch.no_grad():
            optimizer.load_state_dict(loaded["optimizer"])
        _restore_adam_steps(optimizer, loaded["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(loaded["opt_param_scheduler"])
    if rng and meta.get("rng"):
        saved_layout = {k: meta.get(k) for k in layout}
        if saved_layout == layout:
            load_rng_state(path, _rank())
        elif _rank() == 0:
            warnings.warn(f"{path}: RNG states not restored: saved at {saved_layout}, now {layout}",
                          stacklevel=2)
    _barrier()
    return extra_state
