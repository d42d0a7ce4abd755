from rlad_megatron.distributed.compat import apply_cpu_compat
from rlad_megatron.distributed.groups import ParallelGroups, destroy_model_parallel, initialize_model_parallel
from rlad_megatron.distributed.init import WorldInfo, init_distributed, single_process_world

__all__ = ["ParallelGroups", "WorldInfo", "apply_cpu_compat", "destroy_model_parallel",
           "init_distributed", "initialize_model_parallel", "single_process_world"]
