"""rlad-megatron: reinforcement-aware knowledge distillation (RLAD / TRRD) on megatron-core."""

import warnings

# megatron-core warns at import, once per rank and module, that Transformer Engine / apex are
# absent; a run says it once itself (rlad_megatron.models.builder.kernels_line).
warnings.filterwarnings("ignore", message=r"(Transformer Engine and )?Apex (are|is) not installed",
                        category=UserWarning)
# megatron-core's own TransformerConfig default (cuda_graph_scope="full") warns on every model built.
warnings.filterwarnings("ignore", message=r"full scope is deprecated", category=UserWarning)
# megatron-core's own calls of APIs torch deprecated, and a CUDA tuning hint that means nothing on
# CPU (launch/torchrun.sh and launch/slurm.sbatch set CUDA_DEVICE_MAX_CONNECTIONS=1 on GPUs).
warnings.filterwarnings("ignore", message=r"`torch.distributed.all_gather_into_tensor` is deprecated",
                        category=FutureWarning)
warnings.filterwarnings("ignore", message=r"When using async grad allreduce it is recommended", category=UserWarning)
