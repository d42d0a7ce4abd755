"""The package's shape: no import cycles (function-local imports count), modules under 500 lines,
objective names compared only where the objectives are defined, and a new objective is one
registered class that trains a step."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "rlad_megatron"
MAX_LINES = 500
OBJECTIVES_PACKAGE = "rlad_megatron.objectives"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _is_type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Modules of the package that ``name`` imports anywhere (not under ``if TYPE_CHECKING``), each with
    the packages whose ``__init__`` the import runs."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = {id(n) for block in ast.walk(tree) if _is_type_checking_block(block) for n in ast.walk(block)}
    is_package = path.name == "__init__.py"
    targets: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped or not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.Import):
            targets.update(a.name for a in node.names)
            continue
        base = node.module or ""
        if node.level:
            here = name.split(".") if is_package else name.split(".")[:-1]
            here = here[:len(here) - node.level + 1]
            base = ".".join(here + ([base] if base else []))
        targets.update(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names)
    deps: set[str] = set()
    own_packages = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    for target in targets:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        # Importing a.b.c runs a/__init__ and a/b/__init__ too (those the importer sits in are running).
        parts = target.split(".")
        deps.update(p for p in (".".join(parts[:i]) for i in range(1, len(parts) + 1))
                    if p in modules and p not in own_packages and p != name)
    return deps


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    modules = _modules()
    graph = {name: _imports(name, path, modules) for name, path in modules.items()}
    assert _cycles(graph) == []


def test_the_cycle_finder_sees_function_local_and_package_imports(tmp_path):
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    # A function-local import is an edge like any other.
    src = tmp_path / "m.py"
    src.write_text("def f():\n    from rlad_megatron.trainer import Trainer\n")
    deps = _imports("rlad_megatron.config", src, _modules())
    assert "rlad_megatron.trainer" in deps
    src.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from rlad_megatron.trainer import X\n")
    assert _imports("rlad_megatron.config", src, _modules()) == set()
    # `from rlad_megatron.hf.checkpoint import x` also runs rlad_megatron/hf/__init__.py.
    src.write_text("from rlad_megatron.hf.checkpoint import checkpoint_kind\n")
    assert {"rlad_megatron.hf", "rlad_megatron.hf.checkpoint"} <= _imports("rlad_megatron.config", src, _modules())


def test_library_modules_are_under_500_lines():
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}


def test_objective_names_are_compared_only_where_objectives_are_defined():
    from rlad_megatron.objectives import objective_names

    names = set(objective_names())
    offenders = []
    for name, path in _modules().items():
        if name == OBJECTIVES_PACKAGE or name.startswith(OBJECTIVES_PACKAGE + "."):
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Compare):
                continue
            operands = [node.left, *node.comparators]
            literals = {n.value for o in operands for n in ast.walk(o) if isinstance(n, ast.Constant)}
            reads_objective = any(isinstance(n, ast.Attribute) and n.attr == "objective"
                                  for o in operands for n in ast.walk(o))
            # Membership in the registry (the one list of names) is how the config validates the key.
            against_registry = "objective_names()" in ast.unparse(node)
            if (literals & names or reads_objective) and not against_registry:
                offenders.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert offenders == []


# ---------------------------------------------------------------- a toy objective, registered and trained


def _train_toy_objective(rank, world_size, overrides):
    import torch

    from rlad_megatron.config import load_config
    from rlad_megatron.distributed.init import init_distributed
    from rlad_megatron.objectives import OBJECTIVES, Objective, register
    from rlad_megatron.objectives.base import LossInputs, Tokens
    from rlad_megatron.trainer import Trainer

    @register
    class TeacherLogProbOnly(Objective):
        """Raise the sampled tokens' log-probs where the teacher likes them (a toy, not a method)."""

        name = "toy_teacher_weighted_nll"
        uses_teacher_logprobs = True

        def token_loss(self, tok: Tokens, x: LossInputs):
            weight = torch.exp(tok.t).detach()
            return -weight * tok.s, tok.delta_old, {}

    try:
        cfg = load_config(ROOT / "launch" / "configs" / "tiny_cpu.yaml",
                          overrides + ["--distill.objective=toy_teacher_weighted_nll", "--train.steps=1"])
        trainer = Trainer(cfg, init_distributed("cpu"))
        before = [p.detach().clone() for p in trainer.student.policy.parameters()]
        metrics = trainer.train_step()
        moved = any(not torch.equal(a, b) for a, b in zip(before, trainer.student.policy.parameters()))
        return {"loss": metrics["loss"], "moved": moved, "teacher": trainer.teacher is not None,
                "reference": trainer.reference is not None}
    finally:
        OBJECTIVES.pop("toy_teacher_weighted_nll", None)


def test_a_registered_objective_trains_a_step(tmp_path, rl_overrides):
    from tests.harness import run_distributed

    (out,) = run_distributed(_train_toy_objective, 1, args=(rl_overrides(tmp_path, 1, 1, "toy", "rlad"),))
    assert out["teacher"] and not out["reference"], out
    assert out["moved"] and out["loss"] == out["loss"], out


def test_an_unregistered_objective_is_a_config_error():
    from rlad_megatron.config import ConfigError, load_config
    from rlad_megatron.objectives import objective_names

    assert objective_names()[:4] == ["rlad", "grpo", "kdrl", "forward_kl"]
    with pytest.raises(ConfigError, match=re.escape(f"distill.objective: expected one of {objective_names()}, "
                                                    "got 'ppo'")):
        load_config(None, ["--distill.objective=ppo"])


@pytest.mark.parametrize("name", ["rlad", "grpo", "kdrl", "forward_kl"])
def test_objectives_report_only_the_metric_keys_the_step_reduces(name):
    """metrics.LOSS_METRICS is the one list every rank reduces; a key an objective adds outside it
    would be dropped silently."""
    import torch

    from rlad_megatron.config import DistillConfig
    from rlad_megatron.metrics import LOSS_METRICS
    from rlad_megatron.objectives import LossInputs, build_objective

    B, S, V = 3, 5, 11
    lp_s = -torch.rand(B, S, requires_grad=True)
    inputs = LossInputs(lp_s=lp_s, lp_old=lp_s.detach(), advantages=torch.randn(B), mask=torch.ones(B, S, dtype=bool),
                        lp_t=lp_s.detach() - 0.5, lp_ref=lp_s.detach(), entropy=torch.rand(B, S),
                        student_logits=torch.randn(B, S, V, requires_grad=True), teacher_logits=torch.randn(B, S, V))
    cfg = DistillConfig(objective=name, beta=0.1, dual_clip=True, teacher_topk=0)
    _, metrics = build_objective(cfg, vocab_size=V).loss(inputs)
    assert set(metrics) - {"num_tokens"} <= set(LOSS_METRICS), sorted(set(metrics) - set(LOSS_METRICS))
