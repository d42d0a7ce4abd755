"""Fault recovery: SIGKILL during a checkpoint save, and a rank killed under torchrun --max-restarts.

(a) One training run is killed five times, each time at a different point of a checkpoint save
    (tmp dir just created / tensors written / meta.json written but not renamed / renamed but the
    ``latest`` marker not updated / before pruning), and resumed with ``--resume`` after each kill.
    Every resume must start from the newest COMPLETE checkpoint, and every step's metrics must
    equal those of an uninterrupted run bit for bit.
(b) ``torchrun --nproc-per-node 2 --max-restarts 1``: rank 1 is SIGKILLed in the middle of a
    training step; torchrun restarts both ranks, which resume from the last checkpoint and finish.
(c) The same with the teacher on its own layout (student TP=1 x DP=2, teacher TP=2), rank 1 killed
    while the teacher scores; the finished run's metrics equal an uninterrupted run's bit for bit.

The kills are injected by running THIS file as the entry point: ``__main__`` below wraps the
checkpointing/trainer functions named by ``RLAD_TEST_KILL=<point>@<step>`` so that the process
SIGKILLs itself at exactly that point, then calls ``rlad_megatron.train.main``. The library has
no fault hooks of its own.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "launch" / "configs" / "tiny_cpu.yaml"
STEPS = 4
RUN_TIMEOUT_S = 300
# Metrics that are pure functions of the model, data and RNG state (timings are not).
EXACT = ("loss", "reward_mean", "accuracy", "ratio_mean", "entropy", "kl_teacher_k3", "grad_norm",
         "response_length", "teacher_logratio_mean")
KILL_POINTS = ("tmp_dir_created", "tensors_written", "before_publish", "after_rename", "before_prune", "update",
               "teacher_scoring")


# ---------------------------------------------------------------- fault injection (entry point side)


def _install_kill(spec: str) -> None:
    """Wrap library functions so this process SIGKILLs itself at ``<point>@<step>``."""
    import megatron.core.dist_checkpointing as dcp

    import rlad_megatron.rl.scorer as scorer_mod
    import rlad_megatron.rl.train_module as train_module
    import rlad_megatron.trainer as trainer_mod
    from rlad_megatron.checkpointing import files

    point, step = spec.split("@")
    step = int(step)
    if point not in KILL_POINTS:
        raise ValueError(f"RLAD_TEST_KILL: expected one of {KILL_POINTS}, got {point!r}")
    rank_filter = os.environ.get("RLAD_TEST_KILL_RANK")
    rank = int(os.environ.get("RANK", "0"))
    # Under torchrun only the first attempt is killed; the restarted workers must finish.
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        return
    if rank_filter is not None and int(rank_filter) != rank:
        return
    state = {"step": -1}

    def die(where: str) -> None:
        if where == point and state["step"] == step:
            print(f"FAULT: SIGKILL rank {rank} at {point}@{step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    def before(fn, where, pred=lambda *a, **k: True):
        def wrapped(*args, **kwargs):
            if pred(*args, **kwargs):
                die(where)
            return fn(*args, **kwargs)
        return wrapped

    def after(fn, where):
        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            die(where)
            return out
        return wrapped

    save = train_module.save_checkpoint

    def tracking_save(*args, **kwargs):
        state["step"] = kwargs["step"]
        return save(*args, **kwargs)

    train_step = trainer_mod.Trainer.train_step

    def tracking_train_step(self):
        state["step"] = self.step + 1
        return train_step(self)

    train_module.save_checkpoint = tracking_save
    trainer_mod.Trainer.train_step = tracking_train_step
    module = train_module.StudentTrainModule
    module.train_mini_batch = before(module.train_mini_batch, "update")
    scorer_mod.Scorer.teacher_signal = before(scorer_mod.Scorer.teacher_signal, "teacher_scoring")
    files.prepare_tmp_dir = after(files.prepare_tmp_dir, "tmp_dir_created")
    dcp.save = after(dcp.save, "tensors_written")
    files.publish = before(files.publish, "before_publish")
    files.write_text_atomic = before(files.write_text_atomic, "after_rename",
                                     lambda path, *a, **k: Path(path).name == files.LATEST)
    files.prune = before(files.prune, "before_prune")


# ---------------------------------------------------------------- test side


def _overrides(tmp: Path, run: str, *, tp: int, teacher_tp: int | None = None) -> list[str]:
    return [
        "--student.load=null", "--teacher.load=null", "--teacher.model.num_layers=2",
        f"--student.parallel.tensor_model_parallel_size={tp}",
        f"--teacher.parallel.tensor_model_parallel_size={teacher_tp or tp}",
        f"--data.train_path={tmp / 'easy.jsonl'}", "--data.eval_path=null", "--train.eval_interval=0",
        "--rl.prompts_per_step=4", "--rl.group_size=4", "--rl.mini_batch_size=8", "--rl.micro_batch_size=4",
        "--rl.max_new_tokens=3", "--optimizer.lr=1e-2", "--optimizer.warmup_steps=0", "--logging.progress_bar=false",
        "--logging.tensorboard=false", f"--train.steps={STEPS}", "--checkpoint.save_interval=1",
        "--checkpoint.keep_last=2", f"--checkpoint.save_dir={tmp / 'ckpt'}", f"--logging.run_dir={tmp / run}",
    ]


def _env(kill: str | None = None, kill_rank: int | None = None) -> dict[str, str]:
    launcher = re.compile(r"^(SLURM_|MASTER_|TORCHELASTIC_|RLAD_TEST_KILL|(LOCAL_|GROUP_)?RANK$|(LOCAL_)?WORLD_SIZE$)")
    env = {k: v for k, v in os.environ.items() if not launcher.match(k)}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if kill:
        env["RLAD_TEST_KILL"] = kill
    if kill_rank is not None:
        env["RLAD_TEST_KILL_RANK"] = str(kill_rank)
    return env


def _start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    # Own session: a killed run's helper processes (megatron's checkpoint writer) are reaped by group.
    # Output goes to a file, not a pipe, so a stray grandchild holding it open cannot block the test.
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
    proc.log = log
    return proc


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    try:
        proc.wait(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        # SIGTERM first: torchrun's agent forwards it to its workers (they run in their own sessions).
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        _signal_group(proc, signal.SIGKILL)
        proc.wait()
        raise AssertionError(f"run timed out after {RUN_TIMEOUT_S}s:\n{proc.log.read_text()[-4000:]}") from None
    finally:
        _signal_group(proc, signal.SIGKILL)
    return proc.returncode, proc.log.read_text()


def _train_cmd(tmp: Path, run: str, *, tp: int = 1, teacher_tp: int | None = None) -> list[str]:
    return [sys.executable, str(Path(__file__)), "--config", str(TINY), "--resume",
            *_overrides(tmp, run, tp=tp, teacher_tp=teacher_tp)]


def _metrics(run_dir: Path) -> dict[int, list[dict]]:
    """step -> every metrics row written for it (a replayed step appears twice in one run dir)."""
    rows: dict[int, list[dict]] = {}
    path = run_dir / "metrics.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                rows.setdefault(row["step"], []).append(row)
    return rows


def _resumed_at(out: str) -> int:
    m = re.search(r"resumed from \S+ at step (\d+)", out)
    if m:
        return int(m.group(1))
    assert "no complete checkpoint" in out, out[-3000:]
    return 0


def _assert_same(step: int, got: dict, want: dict, where: str) -> None:
    for key in EXACT:
        if key in want:
            assert got.get(key) == want[key], f"{where}: step {step} {key}: {got.get(key)} != {want[key]}"


def _checkpoint_dir_state(save_dir: Path) -> tuple[list[str], str]:
    names = sorted(p.name for p in save_dir.iterdir())
    latest = (save_dir / "latest").read_text().strip() if (save_dir / "latest").is_file() else ""
    return names, latest


# (kill point, step whose save is interrupted, the step the NEXT segment must resume from)
CHAIN = [
    ("tensors_written", 2, 1),  # step 2's tensors are on disk, no meta.json: step_1 is the newest complete
    ("before_publish", 3, 2),  # meta.json written into tmp.step_3 but never renamed
    ("after_rename", 3, 3),  # step_3 renamed into place, `latest` still says step_2: the scan wins
    ("tmp_dir_created", 4, 3),  # an empty tmp.step_4
    ("before_prune", 4, 4),  # step_4 complete and marked latest; old checkpoints not yet pruned
]


def test_sigkill_during_checkpoint_save_resumes_exactly(tmp_path, easy_task):
    easy_task(tmp_path)
    # The uninterrupted reference runs concurrently with the chain (its own checkpoint dir).
    ref_tmp = tmp_path / "ref"
    ref_tmp.mkdir()
    easy_task(ref_tmp)
    reference = _start(_train_cmd(ref_tmp, "run"), _env(), ref_tmp / "run.log")

    resume_from = 0
    seen: dict[int, list[tuple[str, dict]]] = {}
    save_dir = tmp_path / "ckpt"
    for i, (point, step, next_start) in enumerate(CHAIN):
        rc, out = _finish(_start(_train_cmd(tmp_path, f"seg{i}"), _env(kill=f"{point}@{step}"),
                                 tmp_path / f"seg{i}.log"))
        assert rc == -signal.SIGKILL, f"segment {i} ({point}@{step}) was not killed (rc={rc}):\n{out[-3000:]}"
        assert f"FAULT: SIGKILL rank 0 at {point}@{step}" in out
        assert _resumed_at(out) == resume_from, (i, point, out[-2000:])
        for s, rows in _metrics(tmp_path / f"seg{i}").items():
            seen.setdefault(s, []).extend((f"seg{i}", r) for r in rows)
        names, latest = _checkpoint_dir_state(save_dir)
        complete = [n for n in names if n.startswith("step_") and (save_dir / n / "meta.json").is_file()]
        assert complete and complete[-1] == f"step_{next_start:07d}", (point, names)
        if point == "after_rename":
            assert latest == f"step_{step - 1:07d}", (latest, names)  # the marker lags; resume must not trust it
        resume_from = next_start

    rc, out = _finish(_start(_train_cmd(tmp_path, "final"), _env(), tmp_path / "final.log"))
    assert rc == 0, out[-3000:]
    assert _resumed_at(out) == resume_from
    for s, rows in _metrics(tmp_path / "final").items():
        seen.setdefault(s, []).extend(("final", r) for r in rows)

    rc, ref_out = _finish(reference)
    assert rc == 0, ref_out[-3000:]
    ref = {s: rows[-1] for s, rows in _metrics(ref_tmp / "run").items()}
    assert sorted(ref) == list(range(1, STEPS + 1))
    assert sorted(seen) == list(range(1, STEPS + 1)), sorted(seen)
    # Every step the interrupted runs computed, including the ones replayed after a kill, matches.
    replays = 0
    for s, rows in seen.items():
        replays += len(rows) - 1
        for where, row in rows:
            _assert_same(s, row, ref[s], where)
    assert replays >= 3, f"expected several replayed steps, got {replays}"
    names, latest = _checkpoint_dir_state(save_dir)
    assert not [n for n in names if n.startswith("tmp.")], names
    assert latest == f"step_{STEPS:07d}" and f"step_{STEPS:07d}" in names, (latest, names)


def test_torchrun_restarts_after_a_rank_is_killed(tmp_path, easy_task):
    easy_task(tmp_path)
    kill_step = 3  # rank 1 dies inside step 3's update, after step 2's checkpoint
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", "1", "--monitor-interval", "0.5", *_train_cmd(tmp_path, "run", tp=2)[1:]]
    started = time.time()
    rc, out = _finish(_start(cmd, _env(kill=f"update@{kill_step}", kill_rank=1), tmp_path / "torchrun.log"))
    assert rc == 0, out[-4000:]
    assert f"FAULT: SIGKILL rank 1 at update@{kill_step}" in out, out[-4000:]
    assert re.search(rf"resumed from \S+step_{kill_step - 1:07d} at step {kill_step - 1}", out), out[-4000:]
    rows = _metrics(tmp_path / "run")
    assert sorted(rows) == list(range(1, STEPS + 1)), sorted(rows)
    assert all(len(r) == 1 for r in rows.values()), "a step was logged twice"
    names, latest = _checkpoint_dir_state(tmp_path / "ckpt")
    assert latest == f"step_{STEPS:07d}" and not [n for n in names if n.startswith("tmp.")], names
    assert time.time() - started < RUN_TIMEOUT_S


def test_torchrun_restarts_after_a_rank_dies_in_separate_layout_teacher_scoring(tmp_path, easy_task):
    kill_step = 3
    runs = {}
    for name, kill in (("killed", f"teacher_scoring@{kill_step}"), ("reference", None)):
        tmp = tmp_path / name
        tmp.mkdir()
        easy_task(tmp)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "--max-restarts", "1", "--monitor-interval", "0.5",
               *_train_cmd(tmp, "run", tp=1, teacher_tp=2)[1:]]
        # The standalone rendezvous picks a free port, so the uninterrupted reference runs alongside.
        runs[name] = _start(cmd, _env(kill=kill, kill_rank=1 if kill else None), tmp / "torchrun.log")
    results = {name: _finish(proc) for name, proc in runs.items()}
    for name, (rc, out) in results.items():
        assert rc == 0, (name, out[-4000:])
    out = results["killed"][1]
    assert f"FAULT: SIGKILL rank 1 at teacher_scoring@{kill_step}" in out, out[-4000:]
    assert re.search(rf"resumed from \S+step_{kill_step - 1:07d} at step {kill_step - 1}", out), out[-4000:]
    killed, ref = _metrics(tmp_path / "killed" / "run"), _metrics(tmp_path / "reference" / "run")
    assert sorted(killed) == sorted(ref) == list(range(1, STEPS + 1))
    for step, rows in killed.items():
        assert len(rows) == 1, f"step {step} was logged twice"
        _assert_same(step, rows[0], ref[step][0], "killed run")


if __name__ == "__main__":
    if os.environ.get("RLAD_TEST_KILL"):
        _install_kill(os.environ["RLAD_TEST_KILL"])
    from rlad_megatron.train import main

    sys.exit(main(sys.argv[1:]))
