"""Config tree: YAML + overrides, unknown keys and invalid values name the field."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rlad_megatron.config import Config, ConfigError, load_config, parse_overrides, save_config

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "launch" / "configs" / "tiny_cpu.yaml"
CONFIGS = sorted((ROOT / "launch" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_resolve(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)


def test_overrides_are_typed_and_nested():
    tree = parse_overrides(["--rl.group_size=8", "--distill.objective", "grpo", "--distill.tau_align=.inf",
                            "--student.parallel.tensor_model_parallel_size=2"])
    assert tree == {"rl": {"group_size": 8}, "distill": {"objective": "grpo", "tau_align": math.inf},
                    "student": {"parallel": {"tensor_model_parallel_size": 2}}}
    cfg = load_config(None, ["--rl.group_size=8", "--rl.mini_batch_size=32", "--distill.alpha=1"])
    assert cfg.rl.group_size == 8 and cfg.distill.alpha == 1.0 and isinstance(cfg.distill.alpha, float)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["--distill.tau_adv=0", "--data.max_prompt_length=77"])
    out = save_config(cfg, tmp_path)
    again = load_config(out)
    assert again == cfg
    assert yaml.safe_load(out.read_text())["distill"]["tau_align"] == math.inf


@pytest.mark.parametrize("overrides,needle", [
    (["--rl.grup_size=4"], "rl.grup_size: unknown key"),
    (["--nope.x=1"], "nope: unknown key"),
    (["--rl.group_size=four"], "rl.group_size: expected an integer, got 'four'"),
    (["--distill.objective=ppo"], "distill.objective: expected one of"),
    (["--distill.alpha=1.5"], "distill.alpha: expected in [0, 1], got 1.5"),
    (["--student.parallel.tensor_model_parallel_size=3", "--teacher.parallel.tensor_model_parallel_size=3"],
     "student.parallel.tensor_model_parallel_size: expected a divisor of student.model.num_attention_heads=4, got 3"),
    (["--teacher.model.vocab_size=300"], "teacher.model.vocab_size"),
    (["--student.model.num_query_groups=3"], "student.model.num_query_groups: expected a divisor"),
    (["--rl.mini_batch_size=5"], "rl.mini_batch_size: expected a divisor"),
    (["--teacher.parallel.tensor_model_parallel_size=3"],
     "teacher.parallel.tensor_model_parallel_size: expected a divisor"),
    (["--logging.tensorboard=yes please"], "logging.tensorboard: expected a boolean"),
    (["--data.prompt_template=Q:"], "data.prompt_template"),
])
def test_bad_values_name_the_field(overrides, needle):
    with pytest.raises(ConfigError) as info:
        load_config(None, overrides)
    assert needle in str(info.value)
    assert "\n" not in str(info.value)


def test_bad_file_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rl:\n  group_size: 4\n  colour: red\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: rl\.colour: unknown key"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(bad)


def _run_tool(*args):
    return subprocess.run([sys.executable, str(ROOT / "tools" / "print_config.py"), *args],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)


def test_print_config_tool(tmp_path):
    tiny = ROOT / "launch" / "configs" / "tiny_cpu.yaml"
    ok = _run_tool(str(tiny), "--rl.group_size=8")
    assert ok.returncode == 0, ok.stderr
    assert yaml.safe_load(ok.stdout)["rl"]["group_size"] == 8
    bad = _run_tool(str(tiny), "--student.model.hidden_sise=3")
    assert bad.returncode == 1
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and "student.model.hidden_sise: unknown key" in lines[0]


@pytest.mark.parametrize("overrides,world,needle", [
    (["--teacher.parallel.pipeline_model_parallel_size=4", "--teacher.model.num_layers=4"], 2,
     "teacher.parallel: expected tensor_model_parallel_size x pipeline_model_parallel_size = 4 to divide the "
     "world size 2"),
    (["--student.parallel.tensor_model_parallel_size=2"], 3, "student.parallel: expected"),
])
def test_layouts_that_do_not_divide_the_world_name_the_section(overrides, world, needle):
    from rlad_megatron.config import check_world

    cfg = load_config(None, overrides)
    with pytest.raises(ConfigError) as info:
        check_world(cfg, world)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_teacher_layout_is_independent_of_the_students():
    from rlad_megatron.config import check_world, same_layout

    cfg = load_config(None, ["--student.parallel.tensor_model_parallel_size=1",
                             "--teacher.parallel.tensor_model_parallel_size=2",
                             "--teacher.parallel.pipeline_model_parallel_size=1"])
    assert not same_layout(cfg.student, cfg.teacher)
    check_world(cfg, 4)
    # Each pads for its own TP: 200 -> 256 at TP=1, 384 at TP=2 (multiples of 128 x TP); config accepts it.
    cfg = load_config(None, ["--student.model.vocab_size=200", "--teacher.model.vocab_size=200",
                             "--student.model.make_vocab_size_divisible_by=128",
                             "--teacher.model.make_vocab_size_divisible_by=192",
                             "--teacher.parallel.tensor_model_parallel_size=2"])
    assert (cfg.student.padded_vocab_size, cfg.teacher.padded_vocab_size) == (256, 384)


def test_train_entry_point_refuses_a_layout_the_world_cannot_hold():
    """torchrun's WORLD_SIZE against both layouts, before any process group exists: one line, exit 2."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "MASTER_PORT")}
    env.update(WORLD_SIZE="2", RANK="0")
    proc = subprocess.run([sys.executable, "-m", "rlad_megatron.train", "--config", str(TINY),
                           "--teacher.parallel.tensor_model_parallel_size=1",
                           "--teacher.parallel.pipeline_model_parallel_size=4", "--teacher.model.num_layers=4"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and "teacher.parallel: expected" in lines[-1] and "world size 2" in lines[-1]
