"""The GPU suite's commands stay runnable: a dry run of benchmarks/gpu_suite.sh parses every step's
command line (a typo would cost the few minutes a GPU is lent), and bench_generate.py runs each of
its CPU variants and options on a tiny model, its variants giving the same tokens."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from tests.helpers import ROOT


def _env(**extra):
    return {**os.environ, "PYTHONPATH": str(ROOT), **extra}


def test_gpu_suite_dry_run_accepts_every_step(tmp_path):
    env = _env(PY=f"{sys.executable} {ROOT / 'benchmarks' / 'gpu_suite_dry_run.py'}", OUT=str(tmp_path))
    subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh")], cwd=ROOT, env=env, check=True,
                   capture_output=True, text=True, timeout=300)
    report = (tmp_path / "gpu_suite.txt").read_text()
    steps = re.findall(r"\[(\w+): rc=(\d+),", report)
    assert [name for name, _ in steps] == ["graphed_test", "bench_853m", "bench_853m_long_tail", "teacher_phase"]
    assert all(rc == "0" for _, rc in steps), report


def test_gpu_suite_dry_run_rejects_a_mistyped_flag():
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite_dry_run.py"),
                          "benchmarks/bench_generate.py", "--new-tokns", "8"],
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "FAILED" in out.stdout and "--new-tokns" in out.stderr
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite_dry_run.py"),
                          "benchmarks/bench_teacher_phase.py", "--config", "launch/configs/tiny_cpu.yaml",
                          "--teacher.model.num_layer=4"],
                         cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "num_layer" in out.stdout


def test_bench_generate_runs_its_cpu_variants(tmp_path):
    profile = tmp_path / "profile.txt"
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_generate.py"), "--layers", "2", "--hidden", "32",
         "--heads", "4", "--query-groups", "2", "--ffn", "64", "--vocab", "64", "--batch", "8", "--max-rows", "2",
         "--prompt-len", "4", "--new-tokens", "24", "--long-tail", "--temperature", "1", "--fixed-shape",
         "--recompute", "--mismatch", "--profile", "2", "--profile-out", str(profile), "--threads", "1"],
        cwd=ROOT, env=_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300, check=True).stdout
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| variant")]
    names = [row.split(" | ")[0][2:] for row in rows]
    assert names == ["one batch, eager", "pool 2 rows, eager", "one batch, fixed-shape eager",
                     "recompute (no cache)"], out
    # Sampled at temperature 1 from per-row streams: every variant draws the same tokens.
    assert all(row.rstrip(" |").endswith("yes") for row in rows), out
    assert len(re.findall(r"^profile \(one batch", out, flags=re.M)) == 2 and profile.read_text().count("## ") == 2
    gaps = [float(v) for v in re.findall(r"logprob_mismatch_max = ([0-9.e+-]+)", out)]
    assert len(gaps) == 2 and max(gaps) < 1e-4, out  # float32 on CPU: the sampler equals a training forward


def test_bench_generate_reports_a_failing_variant_and_runs_the_others():
    """A variant that raises (here the fixed-shape step) is reported in one FAILED line; the other
    variants are still timed, so a first GPU run whose capture breaks still records the eager numbers."""
    script = (
        "import sys; sys.path.insert(0, 'benchmarks'); import bench_generate\n"
        "from rlad_megatron.rl import graphed_decode\n"
        "def broken(*a, **k): raise RuntimeError('capture broke')\n"
        "graphed_decode._step_body = broken\n"
        "bench_generate.main(sys.argv[1:])\n")
    out = subprocess.run(
        [sys.executable, "-c", script, "--layers", "1", "--hidden", "32", "--heads", "4", "--query-groups", "2",
         "--ffn", "64", "--vocab", "64", "--batch", "4", "--prompt-len", "4", "--new-tokens", "6", "--fixed-shape",
         "--no-pool", "--mismatch", "--threads", "1"],
        cwd=ROOT, env=_env(OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300, check=True).stdout
    assert "FAILED one batch, fixed-shape eager: RuntimeError: capture broke" in out, out
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| variant")]
    assert [row.split(" | ")[0][2:] for row in rows] == ["one batch, eager"], out
    assert "log-prob mismatch (one batch, eager" in out, out
