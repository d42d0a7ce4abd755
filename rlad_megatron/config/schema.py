"""The config tree's dataclasses: one per component, each validating itself (loading: loader.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal, Optional

from rlad_megatron.objectives.registry import objective_names


class ConfigError(ValueError):
    """A config value is unknown, mistyped or inconsistent; the message names the key."""


@dataclass
class ModelConfig:
    """Llama/Qwen-shaped decoder; becomes a megatron-core ``TransformerConfig``."""

    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_query_groups: int = 2
    ffn_hidden_size: int = 128
    vocab_size: int = 256
    # Megatron pads the embedding to a multiple of this times TP; padded rows get -inf logits.
    make_vocab_size_divisible_by: int = 128
    max_position_embeddings: int = 512
    rotary_base: float = 10000.0
    norm_epsilon: float = 1e-6
    untie_embeddings_and_output_weights: bool = True
    add_qkv_bias: bool = False
    qk_layernorm: bool = False
    kv_channels: Optional[int] = None
    init_method_std: float = 0.02
    params_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    # Llama 3.x RoPE scaling (HF rope_type 'llama3'). megatron-core's RotaryEmbedding fixes
    # low_freq_factor=1, high_freq_factor=4 and original_max_position_embeddings=8192, so only
    # the factor is a setting (hf/config_map.py refuses checkpoints with other constants).
    rope_scaling: bool = False
    rope_scaling_factor: float = 8.0
    # Mixture of experts (0: dense): routed experts only, softmax router, top-k.
    num_experts: int = 0
    moe_router_topk: int = 2
    # Expert FFN size (HF moe_intermediate_size); None: ffn_hidden_size. Dense layers keep ffn_hidden_size.
    moe_ffn_hidden_size: Optional[int] = None
    # One character per layer, '1' MoE and '0' dense (Qwen3-MoE mlp_only_layers / decoder_sparse_step);
    # None: every layer is MoE.
    moe_layer_pattern: Optional[str] = None
    # HF norm_topk_prob: renormalise the top-k routing weights to sum to 1 (Mixtral always does);
    # False is megatron's moe_router_pre_softmax (softmax over all experts, top-k weights kept).
    moe_norm_topk_prob: bool = True
    # Router load-balancing loss coefficient (0: off). Must be 0 for a frozen teacher.
    moe_aux_loss_coeff: float = 0.0

    def validate(self, name: str) -> None:
        for key in ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                    "ffn_hidden_size", "vocab_size", "make_vocab_size_divisible_by",
                    "max_position_embeddings"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{name}.{key}: expected a positive integer, got {getattr(self, key)}")
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
                f"{name}.num_query_groups: expected a divisor of num_attention_heads="
                f"{self.num_attention_heads}, got {self.num_query_groups}")
        if self.kv_channels is None and self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"{name}.hidden_size: expected a multiple of num_attention_heads="
                f"{self.num_attention_heads} (or set kv_channels), got {self.hidden_size}")
        if self.rope_scaling and self.rope_scaling_factor < 1.0:
            raise ConfigError(f"{name}.rope_scaling_factor: expected >= 1, got {self.rope_scaling_factor}")
        self._validate_moe(name)

    @property
    def moe_layers(self) -> list[bool]:
        """Per layer: does it hold routed experts."""
        if not self.num_experts:
            return [False] * self.num_layers
        if self.moe_layer_pattern is None:
            return [True] * self.num_layers
        return [c == "1" for c in self.moe_layer_pattern]

    @property
    def expert_ffn_hidden_size(self) -> int:
        return self.moe_ffn_hidden_size or self.ffn_hidden_size

    def _validate_moe(self, name: str) -> None:
        if self.num_experts < 0:
            raise ConfigError(f"{name}.num_experts: expected >= 0 (0: dense), got {self.num_experts}")
        if not self.num_experts:
            for key, dense in (("moe_layer_pattern", None), ("moe_ffn_hidden_size", None)):
                if getattr(self, key) != dense:
                    raise ConfigError(f"{name}.{key}: expected null for a dense model (num_experts=0), "
                                      f"got {getattr(self, key)!r}")
            return
        if not 1 <= self.moe_router_topk <= self.num_experts:
            raise ConfigError(f"{name}.moe_router_topk: expected 1..num_experts={self.num_experts}, "
                              f"got {self.moe_router_topk}")
        if self.moe_ffn_hidden_size is not None and self.moe_ffn_hidden_size <= 0:
            raise ConfigError(f"{name}.moe_ffn_hidden_size: expected a positive integer or null, "
                              f"got {self.moe_ffn_hidden_size}")
        pattern = self.moe_layer_pattern
        if pattern is not None and (len(pattern) != self.num_layers or set(pattern) - {"0", "1"}):
            raise ConfigError(f"{name}.moe_layer_pattern: expected {self.num_layers} characters '0' (dense) "
                              f"or '1' (MoE), one per layer, got {pattern!r}")
        if self.moe_aux_loss_coeff < 0:
            raise ConfigError(f"{name}.moe_aux_loss_coeff: expected >= 0, got {self.moe_aux_loss_coeff}")


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    # Experts split over EP ranks (MoE models only); expert weights are TP-split like dense ones.
    expert_model_parallel_size: int = 1

    def validate(self, name: str) -> None:
        for key in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "expert_model_parallel_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{name}.{key}: expected >= 1, got {getattr(self, key)}")


@dataclass
class ModelSection:
    """A model's shape, its own parallel layout and where its weights come from."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    # Weights to start from: a converted megatron directory, its dist/, an HF directory or a
    # training checkpoint (save dir or step dir); None keeps the random initialisation.
    load: Optional[str] = None
    # Teacher only: parameters live in (pinned) host memory outside the scoring phase, so the
    # student's update runs without them on the device (models/offload.py).
    offload: bool = False

    def validate(self, name: str) -> None:
        self.model.validate(f"{name}.model")
        self.parallel.validate(f"{name}.parallel")
        tp, pp = self.parallel.tensor_model_parallel_size, self.parallel.pipeline_model_parallel_size
        m = self.model
        if m.num_attention_heads % tp:
            raise ConfigError(
                f"{name}.parallel.tensor_model_parallel_size: expected a divisor of "
                f"{name}.model.num_attention_heads={m.num_attention_heads}, got {tp}")
        if m.num_query_groups % tp:
            raise ConfigError(
                f"{name}.parallel.tensor_model_parallel_size: expected a divisor of "
                f"{name}.model.num_query_groups={m.num_query_groups}, got {tp}")
        if m.ffn_hidden_size % tp:
            raise ConfigError(
                f"{name}.parallel.tensor_model_parallel_size: expected a divisor of "
                f"{name}.model.ffn_hidden_size={m.ffn_hidden_size}, got {tp}")
        if m.num_layers % pp:
            raise ConfigError(
                f"{name}.parallel.pipeline_model_parallel_size: expected a divisor of "
                f"{name}.model.num_layers={m.num_layers}, got {pp}")
        ep = self.parallel.expert_model_parallel_size
        if ep > 1 and not m.num_experts:
            raise ConfigError(f"{name}.parallel.expert_model_parallel_size: expected 1 for a dense model "
                              f"({name}.model.num_experts=0), got {ep}")
        if m.num_experts and m.num_experts % ep:
            raise ConfigError(f"{name}.parallel.expert_model_parallel_size: expected a divisor of "
                              f"{name}.model.num_experts={m.num_experts}, got {ep}")
        if m.num_experts and m.expert_ffn_hidden_size % tp:
            raise ConfigError(f"{name}.parallel.tensor_model_parallel_size: expected a divisor of the expert "
                              f"FFN size {m.expert_ffn_hidden_size} ({name}.model.moe_ffn_hidden_size), got {tp}")

    @property
    def padded_vocab_size(self) -> int:
        return padded_vocab_size(self.model.vocab_size, self.model.make_vocab_size_divisible_by,
                                 self.parallel.tensor_model_parallel_size)


def layout(section: ModelSection) -> tuple[int, int, int]:
    """(TP, PP, EP) of a model section: what decides its process groups."""
    p = section.parallel
    return p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.expert_model_parallel_size


def same_layout(a: ModelSection, b: ModelSection) -> bool:
    """Whether two models can share one set of process groups (the EP of a dense model does not count)."""
    return layout(a)[:2] == layout(b)[:2] and (
        not (a.model.num_experts and b.model.num_experts) or layout(a)[2] == layout(b)[2])


def check_world(cfg: Config, world_size: int) -> None:
    """Raise ConfigError when a model's grid does not divide the world (called before any group is built)."""
    for name in ("student", "teacher"):
        tp, pp, ep = layout(getattr(cfg, name))
        for what, size in (("tensor_model_parallel_size x pipeline_model_parallel_size", tp * pp),
                           ("expert_model_parallel_size x tensor_model_parallel_size x "
                            "pipeline_model_parallel_size", ep * tp * pp)):
            if world_size % size:
                raise ConfigError(f"{name}.parallel: expected {what} = {size} to divide the world size "
                                  f"{world_size}, got a remainder of {world_size % size}")


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """Megatron's rule: pad to a multiple of ``divisible_by * tp``."""
    multiple = divisible_by * tp
    return int(math.ceil(vocab_size / multiple) * multiple)


@dataclass
class OptimizerConfig:
    lr: float = 1e-5
    min_lr: float = 0.0
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    warmup_steps: int = 0
    decay_style: Literal["constant", "linear", "cosine"] = "constant"

    def validate(self, name: str) -> None:
        if self.lr < 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError(f"{name}.min_lr: expected 0 <= min_lr <= lr={self.lr}, got {self.min_lr}")
        if self.warmup_steps < 0:
            raise ConfigError(f"{name}.warmup_steps: expected >= 0, got {self.warmup_steps}")


@dataclass
class RLConfig:
    """Rollout and update schedule."""

    prompts_per_step: int = 4
    group_size: int = 4
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    # Sequences per optimizer step (over the whole DP group); a rollout batch makes
    # prompts_per_step * group_size / mini_batch_size optimizer steps.
    mini_batch_size: int = 16
    micro_batch_size: int = 4
    epochs_per_rollout: int = 1
    # Rows held in the rollout's KV caches at once (per DP replica; 0: all prompts x group_size rows).
    # Fewer rows bound KV memory; waiting rows are admitted as others finish (rl/rollout_pool.py).
    max_rollout_rows: int = 0
    # Decode steps as captured CUDA graphs (rl/graphed_decode.py); CUDA only, ignored with a warning on CPU.
    cuda_graphs: bool = False
    # Token-budget micro-batches (DESIGN.md section 4): rows x longest row per micro-batch <= this,
    # each micro-batch trimmed to its longest row, for the student update and teacher/reference
    # scoring; 0 = off (micro_batch_size rows per micro-batch, padded to the rollout's width).
    max_tokens_per_micro_batch: int = 0
    # Log-probs from the final hidden states in chunks of this many positions (never the whole
    # [B, S, V/TP] logits); 0 = materialised logits. Objectives that need the full student
    # logits (forward_kl) keep the materialised path.
    logprob_chunk_size: int = 0
    # Spread each mini-batch's rows over the DP replicas by token count before the update (the
    # mini-batch's objective is unchanged; rl/dp_balance.py); off: each replica trains its own rows.
    balance_dp_tokens: bool = False

    def validate(self, name: str) -> None:
        if self.max_rollout_rows < 0:
            raise ConfigError(f"{name}.max_rollout_rows: expected >= 0 (0: all rows), got {self.max_rollout_rows}")
        for key in ("prompts_per_step", "group_size", "max_new_tokens", "mini_batch_size",
                    "micro_batch_size", "epochs_per_rollout"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{name}.{key}: expected >= 1, got {getattr(self, key)}")
        for key in ("max_tokens_per_micro_batch", "logprob_chunk_size"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{name}.{key}: expected >= 0 (0 = off), got {getattr(self, key)}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"{name}.top_p: expected in (0, 1], got {self.top_p}")
        if self.temperature < 0:
            raise ConfigError(f"{name}.temperature: expected >= 0, got {self.temperature}")
        rollout = self.prompts_per_step * self.group_size
        if rollout % self.mini_batch_size:
            raise ConfigError(
                f"{name}.mini_batch_size: expected a divisor of prompts_per_step*group_size="
                f"{rollout}, got {self.mini_batch_size}")
        if self.mini_batch_size % self.micro_batch_size:
            raise ConfigError(
                f"{name}.micro_batch_size: expected a divisor of mini_batch_size="
                f"{self.mini_batch_size}, got {self.micro_batch_size}")


@dataclass
class DistillConfig:
    """The objective (DESIGN.md sections 1-2); baselines are objectives, not branches."""

    # One of rlad_megatron.objectives.objective_names(): rlad, grpo, kdrl, forward_kl.
    objective: str = "rlad"
    alpha: float = 0.5
    teacher_clamp: float = 1.0
    teacher_clamp_grad: Literal["clamp", "straight_through"] = "clamp"
    eps_low: float = 0.20
    eps_high: float = 0.28
    dual_clip: bool = False
    c_dual: float = 3.0
    beta: float = 0.0
    beta_kd: float = 0.1
    tau_align: float = math.inf
    tau_adv: float = -math.inf
    gate_level: Literal["token", "sequence"] = "token"
    loss_agg: Literal["seq_mean_token_mean", "token_mean"] = "seq_mean_token_mean"
    # Objectives that match the teacher's distribution (forward_kl) get its top-k log-probs per
    # position plus one tail bucket (k clipped to the vocabulary); 0 keeps the teacher's whole
    # logits shard of the rollout (N x S x V/TP: small vocabularies and a shared layout only).
    teacher_topk: int = 64
    # The frozen reference (beta > 0) lives in host memory outside the scoring phase, as teacher.offload.
    reference_offload: bool = False

    def validate(self, name: str) -> None:
        if self.objective not in objective_names():
            raise ConfigError(f"{name}.objective: expected one of {objective_names()}, got {self.objective!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"{name}.alpha: expected in [0, 1], got {self.alpha}")
        for key in ("teacher_clamp", "eps_low", "eps_high", "beta", "beta_kd"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{name}.{key}: expected >= 0, got {getattr(self, key)}")
        if self.teacher_topk < 0:
            raise ConfigError(f"{name}.teacher_topk: expected >= 0 (0 = full logits), got {self.teacher_topk}")
        if self.c_dual <= 1.0:
            raise ConfigError(f"{name}.c_dual: expected > 1, got {self.c_dual}")


@dataclass
class DataConfig:
    train_path: str = "data/gsm8k/train.jsonl"
    eval_path: Optional[str] = None
    question_field: str = "question"
    answer_field: str = "answer"
    prompt_template: str = "Question: {question}\nAnswer:"
    tokenizer_type: Literal["sentencepiece", "huggingface", "char"] = "sentencepiece"
    tokenizer_path: Optional[str] = None
    max_prompt_length: int = 128
    shuffle: bool = True
    # RL prompts are the first N usable rows of train_path (None: all). RL revisiting a small pool
    # shows memorisation rather than generalisation; the tiny default draws fresh prompts instead.
    max_train_examples: Optional[int] = None

    def validate(self, name: str) -> None:
        if "{question}" not in self.prompt_template:
            raise ConfigError(f"{name}.prompt_template: expected a '{{question}}' placeholder, "
                              f"got {self.prompt_template!r}")
        if self.max_prompt_length < 1:
            raise ConfigError(f"{name}.max_prompt_length: expected >= 1, got {self.max_prompt_length}")
        if self.max_train_examples is not None and self.max_train_examples < 1:
            raise ConfigError(f"{name}.max_train_examples: expected >= 1 or null, got {self.max_train_examples}")


@dataclass
class WandbConfig:
    """Optional Weights & Biases writer beside TensorBoard (``pip install -e ".[wandb]"``)."""

    enabled: bool = False
    project: str = "rlad-megatron"
    # None: the run directory's name.
    run_name: Optional[str] = None
    # "offline" writes under <run_dir>/wandb for a later `wandb sync`; "online" needs a login.
    mode: Literal["offline", "online"] = "offline"


@dataclass
class LoggingConfig:
    run_dir: str = "runs/default"
    tensorboard: bool = True
    log_interval: int = 1
    progress_bar: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class CheckpointConfig:
    save_dir: Optional[str] = None
    save_interval: int = 0
    resume: bool = False
    keep_last: int = 2


@dataclass
class TrainConfig:
    steps: int = 10
    seed: int = 1234
    # "auto" picks cuda+nccl when a GPU is visible, else cpu+gloo.
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # Consecutive steps with a non-finite loss or grad norm (skipped) before the run aborts.
    max_nonfinite_steps: int = 3
    # Greedy accuracy of the student on data.eval_path every N steps (0: off) over eval_samples prompts.
    eval_interval: int = 0
    eval_samples: int = 64

    def validate(self, name: str) -> None:
        for key in ("steps", "max_nonfinite_steps", "eval_interval", "eval_samples"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{name}.{key}: expected >= 0, got {getattr(self, key)}")


@dataclass
class Config:
    student: ModelSection = field(default_factory=ModelSection)
    teacher: ModelSection = field(default_factory=ModelSection)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> Config:
        self.student.validate("student")
        self.teacher.validate("teacher")
        self.optimizer.validate("optimizer")
        self.rl.validate("rl")
        self.distill.validate("distill")
        self.data.validate("data")
        self.train.validate("train")
        if self.student.model.vocab_size != self.teacher.model.vocab_size:
            # Padded sizes may differ (each pads for its own TP); the token ids must mean the same.
            raise ConfigError(
                f"teacher.model.vocab_size: teacher and student must share the true vocabulary; expected "
                f"{self.student.model.vocab_size} (the student's), got {self.teacher.model.vocab_size}")
        if self.student.offload:
            raise ConfigError("student.offload: expected false (the student trains on the device; "
                              "distill.reference_offload offloads its frozen reference copy), got true")
        sm = self.student.model
        if sm.num_experts and self.student.parallel.tensor_model_parallel_size > 1:
            # megatron-core's MoELayer trains at TP > 1 only with sequence parallelism, and generation
            # needs a model without it; experts scale over expert_model_parallel_size instead.
            raise ConfigError("student.parallel.tensor_model_parallel_size: expected 1 for an MoE student (megatron "
                              "trains MoE at TP > 1 only with sequence parallelism, which rollouts cannot use), "
                              f"got {self.student.parallel.tensor_model_parallel_size}")
        if self.teacher.model.num_experts and self.teacher.model.moe_aux_loss_coeff:
            raise ConfigError("teacher.model.moe_aux_loss_coeff: expected 0 (the teacher is frozen; a router "
                              f"loss would train nothing), got {self.teacher.model.moe_aux_loss_coeff}")
        if self.distill.teacher_topk == 0 and not same_layout(self.student, self.teacher):
            raise ConfigError("distill.teacher_topk: expected >= 1 when the teacher has its own layout (full "
                              "teacher logits are kept only on the student's layout), got 0")
        return self
