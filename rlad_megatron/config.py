"""The one typed config tree of rlad-megatron.

YAML file -> nested dataclasses, then ``--section.key=value`` overrides. Unknown keys and
invalid values raise :class:`ConfigError` naming the dotted key, the expected and the actual
value. Each component receives only its own sub-config.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


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
    # Optional path to a Megatron dist checkpoint (or HF directory) to initialise from.
    load: Optional[str] = None

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


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False

    def validate(self, name: str) -> None:
        for key in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{name}.{key}: expected >= 1, got {getattr(self, key)}")


@dataclass
class ModelSection:
    """A model together with its own parallel layout."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)

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

    @property
    def padded_vocab_size(self) -> int:
        return padded_vocab_size(self.model.vocab_size, self.model.make_vocab_size_divisible_by,
                                 self.parallel.tensor_model_parallel_size)


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

    def validate(self, name: str) -> None:
        for key in ("prompts_per_step", "group_size", "max_new_tokens", "mini_batch_size",
                    "micro_batch_size", "epochs_per_rollout"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{name}.{key}: expected >= 1, got {getattr(self, key)}")
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

    objective: Literal["rlad", "grpo", "kdrl", "forward_kl"] = "rlad"
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

    def validate(self, name: str) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"{name}.alpha: expected in [0, 1], got {self.alpha}")
        for key in ("teacher_clamp", "eps_low", "eps_high", "beta", "beta_kd"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{name}.{key}: expected >= 0, got {getattr(self, key)}")
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
        if self.student.padded_vocab_size != self.teacher.padded_vocab_size:
            raise ConfigError(
                "teacher.model.vocab_size: teacher and student must share the vocabulary; expected "
                f"padded size {self.student.padded_vocab_size} (student), got "
                f"{self.teacher.padded_vocab_size}")
        if self.student.model.vocab_size != self.teacher.model.vocab_size:
            raise ConfigError(
                f"teacher.model.vocab_size: expected {self.student.model.vocab_size} (the student's), "
                f"got {self.teacher.model.vocab_size}")
        # One megatron parallel_state grid serves both models for now.
        sp, tp_ = self.student.parallel, self.teacher.parallel
        for key in ("tensor_model_parallel_size", "pipeline_model_parallel_size"):
            if getattr(sp, key) != getattr(tp_, key):
                raise ConfigError(
                    f"teacher.parallel.{key}: expected {getattr(sp, key)} (the student's; separate "
                    f"teacher grids are not supported yet), got {getattr(tp_, key)}")
        return self


# ---------------------------------------------------------------- loading and overrides


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; int->float is the only silent widening."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: invalid value {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: expected one of {list(choices)}, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected a boolean, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # PyYAML reads 1e-5 (no dot) and inf as strings; accept any float literal.
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def _build(cls: type, data: Any, prefix: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or '<root>'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key in data:
        if key not in names:
            where = f"{prefix}.{key}" if prefix else str(key)
            raise ConfigError(f"{where}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(v, hints[k], f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    return cls(**kwargs)


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{dotted}: {part} is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(args: list[str]) -> dict:
    """``['--rl.group_size=8', '--distill.objective', 'grpo']`` -> nested dict (YAML-typed values)."""
    tree: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"{arg}: expected an override of the form --section.key=value")
        body = arg[2:]
        if "=" in body:
            key, raw = body.split("=", 1)
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"{body}: override has no value")
            key, raw = body, args[i + 1]
            i += 1
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key, value)
        i += 1
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _yaml_error_line(e: yaml.YAMLError) -> str:
    """PyYAML's multi-line message as one line: the problem and where it is."""
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem


def load_config(path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> Config:
    """Load ``path`` (YAML), apply ``--a.b=c`` overrides, build and validate the tree."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: expected UTF-8 YAML, got byte 0x{e.object[e.start]:02x} "
                              f"at offset {e.start}") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({_yaml_error_line(e)})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    data = _merge(data, parse_overrides(list(overrides or [])))
    try:
        return _build(Config, data, "").validate()
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}" if path is not None else str(e)) from None


def load_config_or_exit(path: Optional[str | Path], overrides: Optional[list[str]] = None, *,
                        exit_code: int = 2) -> Config:
    """For entry points: the config, or its one-line error on stderr and ``SystemExit(exit_code)``."""
    try:
        return load_config(path, overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(exit_code) from None


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def save_config(cfg: Any, directory: str | Path) -> Path:
    """Write the resolved config to ``directory/config.yaml`` atomically."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    out = directory / "config.yaml"
    tmp = out.with_suffix(".yaml.tmp")
    tmp.write_text(to_yaml(cfg))
    tmp.replace(out)
    return out
