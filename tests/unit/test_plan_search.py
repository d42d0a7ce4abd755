"""The 70B -> 8B recipe and the layout search: the recipe resolves and fits; printed layouts re-plan as printed."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from rlad_megatron.config import ParallelConfig, load_config
from rlad_megatron.memory_plan import GIB, model_param_count, plan_memory
from rlad_megatron.memory_search import search_layouts

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "launch" / "configs" / "llama70b_teacher_8b_student.yaml"
TINY_YAML = ROOT / "launch" / "configs" / "tiny_cpu.yaml"
CLUSTER = ["--nodes", "2", "--gpus-per-node", "8", "--gpu-memory-gib", "80", "--flash-attention"]


def _main(module, argv, capsys):
    rc = module.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_print_config_resolves_the_recipe(capsys):
    import tools.print_config as tool

    rc, out, err = _main(tool, [RECIPE], capsys)
    assert rc == 0 and err == ""
    resolved = yaml.safe_load(out)
    assert resolved["teacher"]["model"]["num_layers"] == 80 and resolved["student"]["model"]["num_layers"] == 32
    assert resolved["distill"]["objective"] == "rlad" and resolved["rl"]["max_tokens_per_micro_batch"] > 0
    # The shapes are Llama-3.1's: unpadded (TP=1, 128256 is a multiple of 128), the HF parameter counts.
    cfg = load_config(RECIPE)
    unsharded = {name: model_param_count(dataclasses.replace(getattr(cfg, name), parallel=ParallelConfig()))
                 for name in ("student", "teacher")}
    assert unsharded == {"student": 8_030_261_248, "teacher": 70_553_706_496}


def test_recipe_fits_80_gib_at_its_layout():
    cfg = load_config(RECIPE)
    tp, pp = cfg.student.parallel.tensor_model_parallel_size, cfg.student.parallel.pipeline_model_parallel_size
    plan = plan_memory(cfg, dp=16 // (tp * pp), flash_attention=True)
    assert plan.tp * plan.pp * plan.dp == 16
    assert plan.peak_bytes < 80 * GIB, plan.peak_bytes / GIB


def _printed_rows(out: str) -> list[dict]:
    """The search table's rows as numbers (student and teacher TP PP DP, offload, peak GiB)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["#", "student"]) + 1
    rows = []
    for line in lines[start:]:
        f = line.split()
        if not f or not f[0].isdigit():
            break
        rows.append({"student": tuple(map(int, f[1:4])), "teacher": tuple(int(x) if x != "-" else None for x in f[4:7]),
                     "offload": f[7] == "yes", "peak": float(f[8]), "cost": float(f[-1])})
    return rows


def test_search_prints_layouts_that_fit_when_re_planned(capsys):
    import tools.plan_memory as tool

    rc, out, err = _main(tool, [RECIPE, "--search", *CLUSTER, "--top", "5"], capsys)
    assert rc == 0 and err == ""
    assert "16 GPUs" in out and "cost proxy, not a step-time prediction" in out
    rows = _printed_rows(out)
    assert 1 <= len(rows) <= 5 and [r["cost"] for r in rows] == sorted(r["cost"] for r in rows)
    for r in rows:
        (tp, pp, dp), (tp_t, pp_t, dp_t) = r["student"], r["teacher"]
        cfg = load_config(RECIPE, [f"--student.parallel.tensor_model_parallel_size={tp}",
                                   f"--student.parallel.pipeline_model_parallel_size={pp}",
                                   f"--teacher.parallel.tensor_model_parallel_size={tp_t}",
                                   f"--teacher.parallel.pipeline_model_parallel_size={pp_t}",
                                   f"--teacher.offload={str(r['offload']).lower()}"])
        plan = plan_memory(cfg, dp=dp, flash_attention=True)
        assert tp * pp * dp == tp_t * pp_t * dp_t == 16 and plan.teacher == (tp_t, pp_t, dp_t)
        assert plan.peak_bytes <= 80 * GIB and round(plan.peak_bytes / GIB, 2) == r["peak"]
    # The recipe's own layout is among them.
    cfg = load_config(RECIPE)
    s, t = cfg.student.parallel, cfg.teacher.parallel
    recipe = (s.tensor_model_parallel_size, s.pipeline_model_parallel_size, t.tensor_model_parallel_size,
              t.pipeline_model_parallel_size, cfg.teacher.offload)
    assert recipe in {(*r["student"][:2], *r["teacher"][:2], r["offload"]) for r in rows}


def test_search_ranks_the_offloaded_twin_after_its_layout():
    found = search_layouts(load_config(RECIPE), nodes=2, gpus_per_node=8, gpu_memory_gib=80, flash_attention=True)
    assert found.fits and found.valid >= len(found.fits)
    by_layout = {(c.student, c.teacher, c.offload): c for c in found.fits}
    twins = [(c, by_layout[(c.student, c.teacher, True)]) for c in found.fits
             if not c.offload and (c.student, c.teacher, True) in by_layout]
    assert twins
    for kept, moved in twins:
        # Same FLOPs; the offloaded one copies its teacher weights to the GPU once a step.
        assert moved.cost > kept.cost and moved.plan.peak_bytes <= kept.plan.peak_bytes
        assert moved.plan.host_bytes == max(s.bytes["teacher_weights"] for s in kept.plan.stages)
    # Only offloading fits some layouts: the search finds them too.
    assert any(c.offload and (c.student, c.teacher, False) not in by_layout for c in found.fits)


def test_search_without_a_teacher_and_when_nothing_fits(capsys):
    import tools.plan_memory as tool

    rc, out, _ = _main(tool, [TINY_YAML, "--distill.objective=grpo", "--search", "--nodes", "1",
                              "--gpus-per-node", "4", "--top", "3"], capsys)
    rows = _printed_rows(out)
    assert rc == 0 and "builds no teacher" in out and len(rows) == 3
    assert all(r["teacher"] == (None, None, None) and not r["offload"] for r in rows)
    rc, out, _ = _main(tool, [TINY_YAML, "--search", "--nodes=1", "--gpus-per-node=2", "--gpu-memory-gib=1e-6"],
                       capsys)
    assert rc == 0 and "0 fit" in out and "no layout fits" in out


@pytest.mark.parametrize("args,field", [
    (["--search"], "--nodes"),
    (["--search", "--nodes", "2", "--dp", "2"], "--dp"),
    (["--nodes", "2"], "--nodes"),
    (["--top", "3"], "--top"),
    (["--search", "--nodes", "two"], "--nodes"),
    (["--search", "--nodes", "2", "--top", "0"], "--top"),
    (["--search", "--nodes", "2", "--gpus-per-node=1.5"], "--gpus-per-node"),
    (["--search", "--nodes", "2", "--student.model.num_layers=0"], "student.model.num_layers"),
])
def test_search_bad_input_exits_1_naming_the_option(capsys, args, field):
    import tools.plan_memory as tool

    rc, out, err = _main(tool, [TINY_YAML, *args], capsys)
    assert rc == 1 and out == ""
    assert err.startswith("error: ") and field in err and err.count("\n") == 1, err
