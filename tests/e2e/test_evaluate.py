"""tools/evaluate.py: greedy accuracy equal to the SFT tool's own report, the same answers at TP=1,
TP=2 and DP=2 (with an example count DP does not divide), reproducible sampling with pass@k, and
bad arguments refused in one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rlad_megatron.rl.rewards import reward_batch

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "launch" / "configs" / "tiny_cpu.yaml"
LIMIT = 99


def _tp(size: int) -> list[str]:
    # The config requires teacher and student on one grid.
    return [f"--{m}.parallel.tensor_model_parallel_size={size}" for m in ("student", "teacher")]


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MASTER_", "TORCHELASTIC_"))}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _run(args: list[str], *, nproc: int = 0) -> subprocess.CompletedProcess:
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
                if nproc else [sys.executable])
    return subprocess.run(launcher + [str(ROOT / "tools" / "evaluate.py"), "--config", str(TINY), *args],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)


def _summary(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval") / "student"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "sft.py"), "--config", str(TINY), "--model", "student",
                           "--steps", "150", "--eval-samples", str(LIMIT), "--out", str(out)],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_greedy_accuracy_matches_sft_and_records_are_consistent(model_dir, tmp_path):
    tp1 = _summary(_run(["--load", str(model_dir), "--limit", str(LIMIT), "--out", str(tmp_path / "tp1.jsonl"),
                         *_tp(1)]))
    sft = json.loads((model_dir / "sft_metrics.json").read_text())
    assert tp1["examples"] == LIMIT and tp1["samples"] == 1
    assert tp1["accuracy"] == pytest.approx(sft["eval_accuracy"])
    assert 0 < tp1["accuracy"] < 1, "pick an SFT length whose student is neither hopeless nor perfect"
    records = _records(tmp_path / "tp1.jsonl")
    assert len(records) == LIMIT and [r["line"] for r in records] == sorted(r["line"] for r in records)
    assert [r["rewards"][0] for r in records] == reward_batch(completions=[r["completions"][0] for r in records],
                                                             golds=[r["gold"] for r in records])

    for name, nproc, tp in (("tp2", 2, 2), ("dp2", 2, 1)):
        out = tmp_path / f"{name}.jsonl"
        other = _summary(_run(["--load", str(model_dir), "--limit", str(LIMIT), "--out", str(out), *_tp(tp)],
                              nproc=nproc))
        assert other["accuracy"] == tp1["accuracy"], name
        assert _records(out) == records, name


def test_sampling_reports_pass_at_k_and_is_reproducible(model_dir, tmp_path):
    args = ["--load", str(model_dir), "--limit", "40", "--samples", "4", "--temperature", "1.0", "--seed", "3", *_tp(1)]
    first = _summary(_run(args + ["--out", str(tmp_path / "a.jsonl")]))
    again = _summary(_run(args + ["--out", str(tmp_path / "b.jsonl")]))
    assert first == again and _records(tmp_path / "a.jsonl") == _records(tmp_path / "b.jsonl")
    records = _records(tmp_path / "a.jsonl")
    assert all(len(r["completions"]) == 4 == len(r["rewards"]) for r in records)
    solved = sum(max(r["rewards"]) >= 1 for r in records) / len(records)
    assert first["pass@4"] == pytest.approx(solved) and first["pass@4"] >= first["accuracy"]


@pytest.mark.parametrize("args,message", [
    (["--samples", "2"], "--samples: greedy decoding"),
    (["--limit", "0"], "--limit: expected >= 1, got 0"),
    (["--top-p", "1.5"], "--top-p: expected in (0, 1], got 1.5"),
    (["--student.load=null"], "--load: expected weights to evaluate"),
])
def test_bad_arguments_are_one_line_errors(args, message):
    proc = _run(args)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr[-2000:]
