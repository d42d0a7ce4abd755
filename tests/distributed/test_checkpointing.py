"""Distributed checkpoints: bit-exact resume and cross-layout model resharding (gloo, CPU).

Resume: 4 uninterrupted steps vs 2 steps -> save -> fresh model/optimizer/scheduler (other
init) -> load -> 2 steps, at TP=2, PP=2 and DP=2 with the distributed optimizer; losses, LR and
RNG draws must be identical. Reshard: the TP=2 checkpoint loads at TP=1 (model and Adam state),
the PP=2 one at TP=2; gathered weights equal the saved ones. Plus one-line errors for a
checkpoint of another model and a truncated one.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tests.harness import run_distributed

SEQ, MICRO, NUM_MICRO = 8, 2, 2
VOCAB = 256
LAYERS = 2


def _section(tp: int, pp: int, *, hidden: int = 64, use_do: bool = False):
    from rlad_megatron.config import ModelConfig, ModelSection, ParallelConfig

    return ModelSection(
        model=ModelConfig(num_layers=LAYERS, hidden_size=hidden, num_attention_heads=4, num_query_groups=2,
                          ffn_hidden_size=128, vocab_size=VOCAB, make_vocab_size_divisible_by=8,
                          max_position_embeddings=64),
        parallel=ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                use_distributed_optimizer=use_do))


def _opt_cfg():
    from rlad_megatron.config import OptimizerConfig

    # Warmup + cosine decay so a scheduler that is not restored changes the losses.
    return OptimizerConfig(lr=1e-2, min_lr=1e-3, warmup_steps=1, decay_style="cosine", clip_grad=1.0,
                           weight_decay=0.01)


def _build(section, groups, seed: int):
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from rlad_megatron.models.builder import build_gpt_model
    from rlad_megatron.optim import build_optimizer, wrap_ddp

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    use_do = section.parallel.use_distributed_optimizer
    model = wrap_ddp(build_gpt_model(section, groups, device=torch.device("cpu")),
                     use_distributed_optimizer=use_do, pg_collection=groups.collection)
    optimizer, scheduler = build_optimizer([model], _opt_cfg(), use_distributed_optimizer=use_do, total_steps=6,
                                           pg_collection=groups.collection)
    return model, optimizer, scheduler


def _train_step(model, optimizer, scheduler, groups, ids_BS):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    model.zero_grad_buffer()
    optimizer.zero_grad()
    ids_BS = ids_BS.chunk(groups.dp_size)[groups.dp_rank]
    positions = torch.arange(SEQ).unsqueeze(0)

    def forward_step(data_iterator, model):
        x_BS = next(data_iterator)
        out = model(x_BS, positions.expand(x_BS.shape[0], -1), None, labels=torch.roll(x_BS, -1, dims=1))

        def loss_func(loss_BS):
            loss = loss_BS.float().mean()
            return loss, {"loss": loss.detach().clone()}

        return out, loss_func

    res = get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter(ids_BS.split(MICRO)),
                                      model=[model], num_microbatches=NUM_MICRO, seq_length=SEQ,
                                      micro_batch_size=MICRO, forward_only=False)
    ok, grad_norm, _ = optimizer.step()
    assert ok
    scheduler.step(increment=1)
    return [r["loss"] for r in res], grad_norm, optimizer.param_groups[0]["lr"]


def _draws():
    import random

    import numpy as np
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    # On CPU the tracker's generator is the CPU one, so compare its saved states, not draws in fork().
    tracked = {k: v.clone() for k, v in get_cuda_rng_tracker().get_states().items()}
    return [random.random(), float(np.random.rand()), torch.rand(3), tracked]


def _resume_case(rank, world_size, tp, pp, use_do, save_dir, batches, reshard_to):
    import torch.distributed as dist

    from rlad_megatron.checkpointing import latest_checkpoint, load_checkpoint, save_checkpoint
    from rlad_megatron.config import Config
    from rlad_megatron.distributed import initialize_model_parallel
    from rlad_megatron.models.weights import model_state_dict

    section = _section(tp, pp, use_do=use_do)
    groups = initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, seed=5)

    model, opt, sched = _build(section, groups, seed=11)
    reference = [_train_step(model, opt, sched, groups, batches[i]) for i in range(4)]

    model, opt, sched = _build(section, groups, seed=11)
    resumed = [_train_step(model, opt, sched, groups, batches[i]) for i in range(2)]
    saved_extra = {"step": 2, "consumed_samples": 2 * batches[0].shape[0], "note": "resume"}
    path = save_checkpoint(directory=save_dir, step=2, model_chunks=[model], optimizer=opt, scheduler=sched,
                           extra_state=saved_extra, config=Config(student=section), keep_last=2)
    saved = dict(tp_rank=groups.tp_rank, pp_rank=groups.pp_rank, dp_rank=groups.dp_rank,
                 state=model_state_dict(model.module), exp_avg=None if use_do else _exp_avg_by_name(model, opt))
    draws_after_save = _draws()

    model, opt, sched = _build(section, groups, seed=99)  # different init: the load must overwrite it
    extra = load_checkpoint(directory=save_dir, model_chunks=[model], optimizer=opt, scheduler=sched)
    draws_after_load = _draws()
    resumed += [_train_step(model, opt, sched, groups, batches[i]) for i in (2, 3)]
    out = dict(is_last=groups.is_last_stage, reference=reference, resumed=resumed, extra=extra,
               saved_extra=saved_extra, path=str(path), latest=str(latest_checkpoint(save_dir)),
               draws=(draws_after_save, draws_after_load), saved=saved)
    if reshard_to is not None:
        out["reshard"] = _reshard(Path(path), *reshard_to)
    dist.barrier()
    return out


def _reshard(path, tp, pp):
    """Load ``path`` at another TP/PP (model and Adam state), then the one-line error cases."""
    import torch.distributed as dist

    from rlad_megatron.checkpointing import load_checkpoint
    from rlad_megatron.distributed import initialize_model_parallel
    from rlad_megatron.models.weights import model_state_dict

    groups = initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, seed=5)
    model, opt, sched = _build(_section(tp, pp), groups, seed=123)
    load_checkpoint(directory=path, model_chunks=[model], optimizer=opt, scheduler=sched)
    out = dict(tp_rank=groups.tp_rank, pp_rank=groups.pp_rank, dp_rank=groups.dp_rank,
               state=model_state_dict(model.module), exp_avg=_exp_avg_by_name(model, opt), errors={})

    truncated = path.parent / "truncated" / path.name
    if dist.get_rank() == 0:
        shutil.copytree(path, truncated)
        victim = sorted(truncated.glob("*.distcp"))[0]
        victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])
    dist.barrier()
    other, _, _ = _build(_section(tp, pp, hidden=32), groups, seed=1)  # another model: hidden 32, not 64
    for kind, ckpt, chunk in [("other_model", path, other), ("truncated", truncated, model)]:
        try:
            load_checkpoint(directory=ckpt, model_chunks=[chunk])
            out["errors"][kind] = None
        except ValueError as e:
            out["errors"][kind] = (str(ckpt), str(e))
    return out


def _exp_avg_by_name(model, optimizer) -> dict:
    """Adam first moments keyed by parameter name (non-distributed fp32 optimizer: main param = param)."""
    inner = optimizer.chained_optimizers[0].optimizer if hasattr(optimizer, "chained_optimizers") \
        else optimizer.optimizer
    return {name: inner.state[p]["exp_avg"].clone() for name, p in model.module.named_parameters()
            if p in inner.state}


# name: (tp, pp, distributed optimizer, layout to reshard the checkpoint to)
LAYOUTS = {"tp2": (2, 1, False, (1, 1)), "pp2": (1, 2, False, (2, 1)), "dp2_distopt": (1, 1, True, None)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    cache: dict = {}

    def get(name):
        if name not in cache:
            tp, pp, use_do, reshard_to = LAYOUTS[name]
            dp = 2 // (tp * pp)
            gen = torch.Generator().manual_seed(torch.seed() % 2**31)
            batches = [torch.randint(0, VOCAB, (MICRO * NUM_MICRO * dp, SEQ), generator=gen) for _ in range(4)]
            save_dir = tmp_path_factory.mktemp(name)
            cache[name] = (save_dir, run_distributed(_resume_case, 2,
                                                     args=(tp, pp, use_do, save_dir, batches, reshard_to)))
        return cache[name]

    return get


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_resume_is_bit_exact(runs, layout):
    save_dir, results = runs(layout)
    for r in results:
        assert r["extra"] == r["saved_extra"]
        assert r["path"] == r["latest"] == str(save_dir / "step_0000002")
        assert (save_dir / "step_0000002" / "config.yaml").is_file()
        for step, (ref, res) in enumerate(zip(r["reference"], r["resumed"])):
            ref_losses, ref_norm, ref_lr = ref
            losses, norm, lr = res
            assert lr == ref_lr, f"step {step}: lr {lr} != {ref_lr}"
            assert norm == ref_norm, f"step {step}: grad norm {norm} != {ref_norm}"
            assert len(losses) == len(ref_losses) == (NUM_MICRO if r["is_last"] else 0)
            for a, b in zip(losses, ref_losses):
                assert torch.equal(a, b), f"step {step}: loss {a} != {b}"
        after_save, after_load = r["draws"]
        assert after_save[:2] == after_load[:2]
        assert torch.equal(after_save[2], after_load[2])
        assert after_save[3].keys() == after_load[3].keys()
        assert all(torch.equal(after_save[3][k], after_load[3][k]) for k in after_save[3])


def _gather(shards, key, tp, pp):
    from rlad_megatron.hf.rank_layout import unshard_state_dicts

    by_rank = {(r["tp_rank"], r["pp_rank"]): r[key] for r in shards if r["dp_rank"] == 0}
    return unshard_state_dicts(by_rank, tp_size=tp, pp_size=pp, num_layers=LAYERS)


def _assert_same(full_a, full_b):
    assert set(full_a) == set(full_b)
    for name in full_a:
        assert torch.equal(full_a[name], full_b[name]), name


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_checkpoint_loads_at_another_layout(runs, layout):
    _, results = runs(layout)
    tp, pp, _, (new_tp, new_pp) = LAYOUTS[layout]
    saved = [r["saved"] for r in results]
    loaded = [r["reshard"] for r in results]
    _assert_same(_gather(loaded, "state", new_tp, new_pp), _gather(saved, "state", tp, pp))
    # The non-distributed optimizer keeps Adam moments as sharded tensors: they reshard too.
    _assert_same(_gather(loaded, "exp_avg", new_tp, new_pp), _gather(saved, "exp_avg", tp, pp))


@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_bad_checkpoints_give_one_line_errors(runs, layout):
    _, results = runs(layout)
    for r in results:
        ckpt, err = r["reshard"]["errors"]["other_model"]
        assert "\n" not in err and ckpt in err and "tensor '" in err and "shape" in err, err
        ckpt, err = r["reshard"]["errors"]["truncated"]
        assert "\n" not in err and ckpt in err and "corrupt" in err, err
