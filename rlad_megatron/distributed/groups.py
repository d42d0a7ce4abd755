"""Process groups. The only module that reads megatron-core's global ``parallel_state`` or creates groups.

Everything else receives a :class:`ParallelGroups` (or single groups) as arguments. megatron's
global ``parallel_state`` is the student's grid (its DDP, optimizer and RNG trackers read it); a
teacher on its own layout gets a second, complete set of groups over the same ranks
(:func:`build_layout_groups`), which megatron-core takes through ``pg_collection``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.hyper_comm_grid import HyperCommGrid
from megatron.core.process_groups_config import ProcessGroupCollection


@dataclass(frozen=True)
class ParallelGroups:
    tp: dist.ProcessGroup
    pp: dist.ProcessGroup
    dp: dist.ProcessGroup
    # The DP group including context parallel; what megatron's DDP and optimizer reduce over.
    dp_cp: dist.ProcessGroup
    mp: dist.ProcessGroup
    tp_rank: int
    tp_size: int
    pp_rank: int
    pp_size: int
    dp_rank: int
    dp_size: int
    # megatron-core models take this collection so they never fall back to global state.
    collection: ProcessGroupCollection
    # Expert parallelism (MoE): experts split over ``ep``; expert weights TP-split over ``expert_tp``
    # (megatron's default expert TP = TP); ``expert_dp`` replicates each expert shard, what
    # megatron's DDP reduces expert gradients over. With EP=1 they are 1-rank / TP / DP groups.
    ep: dist.ProcessGroup
    ep_rank: int
    ep_size: int
    expert_tp: dist.ProcessGroup
    expert_dp: dist.ProcessGroup

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def pp_last_rank(self) -> int:
        """Global rank of the last pipeline stage in this rank's pipeline."""
        return dist.get_process_group_ranks(self.pp)[-1]

    @property
    def pp_first_rank(self) -> int:
        return dist.get_process_group_ranks(self.pp)[0]


def initialize_model_parallel(*, tensor_model_parallel_size: int, pipeline_model_parallel_size: int,
                              seed: int, expert_model_parallel_size: int = 1) -> ParallelGroups:
    """Build megatron's TP x PP x DP grid, and its expert grid EP x expert-TP x PP x expert-DP.

    The world must already be initialised; also seeds megatron's RNGs (expert-parallel streams included).
    """
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    world = dist.get_world_size()
    mp = tensor_model_parallel_size * pipeline_model_parallel_size
    if world % mp:
        raise ValueError(
            f"world size {world} is not divisible by tensor_model_parallel_size x "
            f"pipeline_model_parallel_size = {tensor_model_parallel_size} x {pipeline_model_parallel_size}")
    # Expert TP is megatron's default (= TP), so the expert grid needs EP x TP x PP to divide the world.
    if world % (mp * expert_model_parallel_size):
        raise ValueError(
            f"world size {world} is not divisible by expert_model_parallel_size x tensor_model_parallel_size x "
            f"pipeline_model_parallel_size = {expert_model_parallel_size} x {tensor_model_parallel_size} x "
            f"{pipeline_model_parallel_size}")
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        expert_model_parallel_size=expert_model_parallel_size,
    )
    model_parallel_cuda_manual_seed(seed)
    return current_groups()


def current_groups() -> ParallelGroups:
    ps = parallel_state
    return ParallelGroups(
        tp=ps.get_tensor_model_parallel_group(),
        pp=ps.get_pipeline_model_parallel_group(),
        dp=ps.get_data_parallel_group(),
        dp_cp=ps.get_data_parallel_group(with_context_parallel=True),
        mp=ps.get_model_parallel_group(),
        tp_rank=ps.get_tensor_model_parallel_rank(),
        tp_size=ps.get_tensor_model_parallel_world_size(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        pp_size=ps.get_pipeline_model_parallel_world_size(),
        dp_rank=ps.get_data_parallel_rank(),
        dp_size=ps.get_data_parallel_world_size(),
        collection=ProcessGroupCollection.use_mpu_process_groups(),
        ep=ps.get_expert_model_parallel_group(),
        ep_rank=ps.get_expert_model_parallel_rank(),
        ep_size=ps.get_expert_model_parallel_world_size(),
        expert_tp=ps.get_expert_tensor_parallel_group(),
        expert_dp=ps.get_expert_data_parallel_group(),
    )


def _check_divides(world: int, *, tp: int, pp: int, ep: int, what: str) -> None:
    if world % (tp * pp) or world % (tp * pp * ep):
        raise ValueError(f"{what}: expected TP x PP = {tp} x {pp} and EP x TP x PP = {ep} x {tp} x {pp} to divide "
                         f"the world size {world}")


def build_layout_groups(*, tensor_model_parallel_size: int, pipeline_model_parallel_size: int,
                        expert_model_parallel_size: int = 1, what: str = "teacher.parallel") -> ParallelGroups:
    """A second TP x PP x DP grid (and EP grid) over all ranks, leaving megatron's ``parallel_state`` alone.

    Rank order is megatron's default ``tp-cp-ep-dp-pp`` (TP fastest, PP slowest), so a layout equal to
    the student's gets the same rank sets. Every rank must call this, in the same order (creating a
    group is collective over the world).
    """
    tp, pp, ep = tensor_model_parallel_size, pipeline_model_parallel_size, expert_model_parallel_size
    world, rank = dist.get_world_size(), dist.get_rank()
    _check_divides(world, tp=tp, pp=pp, ep=ep, what=what)
    dp, expert_dp = world // (tp * pp), world // (tp * pp * ep)
    grid = HyperCommGrid([tp, 1, dp, pp], ["tp", "cp", "dp", "pp"])
    # Expert TP = TP (megatron's default), as for the student.
    expert = HyperCommGrid([tp, ep, expert_dp, pp], ["tp", "ep", "dp", "pp"])
    pc = dict(tp=grid.create_pg("tp"), cp=grid.create_pg("cp"), pp=grid.create_pg("pp"), dp=grid.create_pg("dp"),
              mp=grid.create_pg(["tp", "pp"]), tp_cp=grid.create_pg(["tp", "cp"]),
              dp_cp=grid.create_pg(["cp", "dp"]), tp_dp_cp=grid.create_pg(["tp", "cp", "dp"]),
              ep=expert.create_pg("ep"), expt_tp=expert.create_pg("tp"), expt_dp=expert.create_pg("dp"),
              tp_ep=expert.create_pg(["tp", "ep"]), tp_ep_pp=expert.create_pg(["tp", "ep", "pp"]))
    # The embedding group ties the first and last stage of each pipeline (the tied output layer);
    # the position-embedding group is the first stage. Every rank creates every pipeline's groups.
    for pipeline in grid.get_rank_enum("pp"):
        for key, ranks in (("embd", sorted({pipeline[0], pipeline[-1]})), ("pos_embd", [pipeline[0]])):
            group = dist.new_group(ranks=ranks)
            if rank in ranks:
                pc[key] = group
    pc.setdefault("embd", None)
    pc.setdefault("pos_embd", None)
    collection = ProcessGroupCollection(**pc)
    return ParallelGroups(
        tp=pc["tp"], pp=pc["pp"], dp=pc["dp"], dp_cp=pc["dp_cp"], mp=pc["mp"],
        tp_rank=dist.get_rank(pc["tp"]), tp_size=tp, pp_rank=dist.get_rank(pc["pp"]), pp_size=pp,
        dp_rank=dist.get_rank(pc["dp"]), dp_size=dp, collection=collection,
        ep=pc["ep"], ep_rank=dist.get_rank(pc["ep"]), ep_size=ep, expert_tp=pc["expt_tp"], expert_dp=pc["expt_dp"])


def destroy_model_parallel() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
