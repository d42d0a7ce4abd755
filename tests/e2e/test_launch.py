"""The launch scripts on real multi-node set-ups built on this one machine.

- launch/slurm.sbatch submitted with `sbatch --nodes=2` to a real Slurm (slurmctld + two slurmd on
  127.0.0.1, started by launch/cluster/slurm_local.sh);
- launch/torchrun.sh run with NNODES=2 in two network namespaces joined by a veth pair
  (launch/cluster/netns_pair.sh), so gloo really crosses an interface between "nodes".

The launched program is a parameter: tools/dist_check.py (rendezvous + all_reduce) always, and the
trainer for 2 steps when `python -m rlad_megatron.train --help` works. Needs root; installs
slurm-wlm/munge/iproute2 with apt-get when missing and skips with the reason when it cannot.
Everything started is stopped by PID (process groups) in finally blocks / fixture teardowns.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from rlad_megatron.distributed.init import free_port

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "launch" / "cluster"
TINY_CONFIG = REPO / "launch" / "configs" / "tiny_cpu.yaml"
JOB_TIMEOUT_S = 300
# Small enough that two steps take seconds on 2 CPU cores; from scratch (no SFT checkpoint needed).
TRAINER_OVERRIDES = (
    "--train.steps=2", "--student.load=null", "--teacher.load=null",
    "--rl.prompts_per_step=4", "--rl.group_size=4", "--rl.mini_batch_size=16", "--rl.micro_batch_size=8",
    "--optimizer.warmup_steps=1", "--train.eval_interval=0", "--checkpoint.save_interval=0",
    "--logging.progress_bar=false",
)
# Variables of an enclosing launcher (pytest itself run under torchrun or Slurm) must not leak in.
_LAUNCHER_VARS = re.compile(r"^(SLURM_|MASTER_|TORCHELASTIC_|(LOCAL_|GROUP_)?RANK$|(LOCAL_)?WORLD_SIZE$)")

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="launch tests need Linux")


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not _LAUNCHER_VARS.match(k)}
    # Debian keeps the daemons and `ip` in sbin, which a non-login PATH may lack.
    env["PATH"] = env.get("PATH", "") + ":/usr/local/sbin:/usr/sbin:/sbin"
    env.update(extra)
    return env


def _free_port_pair() -> int:
    """A port p with p and p + 1 both free (the two slurmd)."""
    for _ in range(50):
        p = free_port()
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", p + 1))
            return p
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports found")


def _run(cmd: list[str], *, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------------------------------------------ entries
@dataclass(frozen=True)
class Entry:
    """What the launch scripts run: ENTRY/CONFIG variables, extra arguments and a check of its output."""

    name: str
    entry: str
    config: str
    args: tuple[str, ...]
    run_dir: Path | None = None

    def check(self, output: str, *, world: int) -> None:
        if self.name == "dist_check":
            ranks = sorted(int(r) for r in re.findall(rf"dist_check rank=(\d+) world={world} .* OK$", output, re.M))
            assert ranks == list(range(world)), f"expected an OK line from each of {world} ranks:\n{output[-4000:]}"
        else:
            assert "Traceback" not in output, output[-4000:]
            assert re.search(r"^(\[\w+\]:)?step 2:", output, re.M), f"training log shows no step 2:\n{output[-4000:]}"
            metrics = self.run_dir / "metrics.jsonl"
            assert metrics.exists(), f"{metrics} missing:\n{output[-4000:]}"
            steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
            assert {1, 2} <= set(steps) and max(steps) == 2, f"{metrics}: expected steps 1 and 2, got {steps}"


def _trainer_unavailable_reason() -> str | None:
    if not TINY_CONFIG.exists():
        return f"trainer entry point not available ({TINY_CONFIG.relative_to(REPO)} missing)"
    # --help alone answers before the heavy imports; the training loop must import too.
    probes = {"--help": [sys.executable, "-m", "rlad_megatron.train", "--help"],
              "import": [sys.executable, "-c", "import rlad_megatron.train, rlad_megatron.trainer"]}
    for what, cmd in probes.items():
        try:
            proc = _run(cmd, env=_clean_env(), timeout=180)
        except subprocess.TimeoutExpired:
            return f"trainer entry point not available ({what} timed out)"
        if proc.returncode != 0:
            last = (proc.stderr.strip().splitlines() or [""])[-1][-300:]
            return f"trainer entry point not available ({what} exited {proc.returncode}: {last})"
    return None


@pytest.fixture(scope="module")
def trainer_reason() -> str | None:
    return _trainer_unavailable_reason()


@pytest.fixture(params=["dist_check", "trainer"])
def entry(request, tmp_path) -> Entry:
    if request.param == "dist_check":
        return Entry("dist_check", "tools/dist_check.py", "", ("--numel", "64"))
    reason = request.getfixturevalue("trainer_reason")
    if reason is not None:
        pytest.skip(reason)
    run_dir = tmp_path / "run"
    return Entry("trainer", "-m rlad_megatron.train", str(TINY_CONFIG.relative_to(REPO)),
                 (*TRAINER_OVERRIDES, f"--logging.run_dir={run_dir}", f"--checkpoint.save_dir={run_dir / 'ckpt'}"),
                 run_dir)


# ------------------------------------------------------------------------------ machine preconditions
@pytest.fixture(scope="session")
def as_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("launch tests start daemons and network namespaces: they need root")


@pytest.fixture(scope="session")
def packages(as_root) -> None:
    """slurm-wlm, munge and iproute2, installed with apt-get only when a tool is missing."""
    tools = ("slurmctld", "slurmd", "sbatch", "munged", "mungekey", "ip")
    env = _clean_env()
    missing = [t for t in tools if not any(Path(d, t).exists() for d in env["PATH"].split(":") if d)]
    if not missing:
        return
    try:
        proc = _run(["bash", str(CLUSTER / "install_deps.sh")], env=env, timeout=900)
    except subprocess.TimeoutExpired:
        pytest.skip(f"{', '.join(missing)} missing and install_deps.sh timed out")
    if proc.returncode != 0:
        pytest.skip(f"{', '.join(missing)} missing and cannot be installed: {(proc.stdout + proc.stderr)[-500:]}")


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# ------------------------------------------------------------------------------------------- Slurm
@pytest.fixture(scope="module")
def slurm_cluster(packages, tmp_path_factory):
    """A two-node Slurm on localhost; yields the environment (SLURM_CONF) for sbatch/scontrol."""
    state = tmp_path_factory.mktemp("slurm")
    env = _clean_env(SLURMCTLD_PORT=str(free_port()), SLURMD_PORT=str(_free_port_pair()),
                     SLURM_CONF=str(state / "slurm.conf"))
    script = str(CLUSTER / "slurm_local.sh")
    try:
        proc = _run(["bash", script, "up", str(state)], env=env, timeout=120)
        if proc.returncode != 0:
            pytest.fail(f"slurm_local.sh up failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        yield env
    finally:
        _run(["bash", script, "down", str(state)], env=env, timeout=60)
        # Whatever `down` could not stop: the daemons' process groups, by the PIDs `up` recorded.
        for pidfile in (state / "pids").glob("*"):
            _kill_group(int(pidfile.read_text()))


_TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
             "BOOT_FAIL", "DEADLINE"}


def _wait_for_job(job_id: str, *, env: dict[str, str], timeout: float) -> tuple[str, str]:
    """(JobState, ExitCode) once the job ends; slurmctld keeps it visible for MinJobAge."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = _run(["scontrol", "show", "job", "-o", job_id], env=env, timeout=30).stdout
        state = re.search(r"\bJobState=(\S+)", out)
        if state and state.group(1) in _TERMINAL:
            return state.group(1), re.search(r"\bExitCode=(\S+)", out).group(1)
        time.sleep(1)
    _run(["scancel", job_id], env=env, timeout=30)
    raise TimeoutError(f"Slurm job {job_id} did not finish within {timeout:.0f} s")


def _sbatch_two_nodes(slurm_cluster, entry: Entry, tmp_path: Path) -> None:
    env = {**slurm_cluster, "PYTHON": sys.executable, "CONFIG": entry.config, "ENTRY": entry.entry,
           "RDZV_PORT": str(free_port()), "LOG_ROOT": str(tmp_path / "logs")}
    submit = _run(["sbatch", "--parsable", "--nodes=2", "--job-name=rladtest", f"--output={tmp_path}/slurm-%j.out",
                   "launch/slurm.sbatch", *entry.args], env=env, timeout=60)
    assert submit.returncode == 0, submit.stderr
    job_id = submit.stdout.strip().split(";")[0]
    try:
        state, exit_code = _wait_for_job(job_id, env=env, timeout=JOB_TIMEOUT_S)
    finally:
        batch_out = "".join(p.read_text() for p in tmp_path.glob("slurm-*.out"))
        node_logs = sorted((tmp_path / "logs" / f"rladtest-{job_id}").glob("node*.log"))
        output = "".join(p.read_text(errors="replace") for p in node_logs)
    assert (state, exit_code) == ("COMPLETED", "0:0"), \
        f"job {job_id}: {state} {exit_code}\n{batch_out}\n{output[-4000:]}"
    assert [p.name for p in node_logs] == ["node0.log", "node1.log"], "expected one log per node in the job's log dir"
    assert f"job {job_id} finished with exit code 0" in batch_out, batch_out
    entry.check(output, world=2)


def test_slurm_sbatch_two_nodes(slurm_cluster, entry, tmp_path):
    _sbatch_two_nodes(slurm_cluster, entry, tmp_path)


def test_slurm_two_nodes_teacher_on_its_own_layout(slurm_cluster, trainer_reason, tmp_path):
    """The student at TP=1 x DP=2 (one rank per node) and the teacher at TP=2 across both nodes."""
    if trainer_reason is not None:
        pytest.skip(trainer_reason)
    run_dir = tmp_path / "run"
    layout = ("--student.parallel.tensor_model_parallel_size=1", "--teacher.parallel.tensor_model_parallel_size=2")
    entry = Entry("trainer", "-m rlad_megatron.train", str(TINY_CONFIG.relative_to(REPO)),
                  (*TRAINER_OVERRIDES, *layout, f"--logging.run_dir={run_dir}",
                   f"--checkpoint.save_dir={run_dir / 'ckpt'}"), run_dir)
    _sbatch_two_nodes(slurm_cluster, entry, tmp_path)
    saved = (run_dir / "config.yaml").read_text()
    assert "tensor_model_parallel_size: 1" in saved and "tensor_model_parallel_size: 2" in saved


# -------------------------------------------------------------------------------- network namespaces
@pytest.fixture(scope="module")
def netns_pair(packages):
    """Two namespaces joined by a veth; yields [(namespace, address, interface)] for the two "nodes"."""
    name = f"rlad{os.getpid() % 10**6}"
    script = str(CLUSTER / "netns_pair.sh")
    env = _clean_env()
    try:
        proc = _run(["bash", script, "up", name], env=env, timeout=60)
        if proc.returncode != 0:
            pytest.skip(f"cannot create network namespaces here: {proc.stderr.strip()[-300:]}")
        yield [tuple(line.split()) for line in proc.stdout.splitlines()]
    finally:
        _run(["bash", script, "down", name], env=env, timeout=60)


def test_torchrun_two_netns_nodes(netns_pair, entry, tmp_path):
    (_, host_addr, _), _ = netns_pair
    port = 29500  # each namespace has its own ports: nothing else listens there
    procs, logs = [], []
    try:
        for i, (ns, addr, ifname) in enumerate(netns_pair):
            env = _clean_env(NNODES="2", NPROC_PER_NODE="1", RDZV_ENDPOINT=f"{host_addr}:{port}",
                             RDZV_ID=f"netns{os.getpid()}", RDZV_CONF=f"is_host={int(i == 0)}", LOCAL_ADDR=addr,
                             GLOO_SOCKET_IFNAME=ifname, PYTHON=sys.executable, CONFIG=entry.config, ENTRY=entry.entry)
            logs.append(tmp_path / f"{ns}.log")
            with logs[-1].open("w") as log:
                procs.append(subprocess.Popen(["ip", "netns", "exec", ns, "bash", "launch/torchrun.sh",
                                               *entry.args], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                              start_new_session=True))
        deadline = time.monotonic() + JOB_TIMEOUT_S
        codes = [p.wait(timeout=max(1.0, deadline - time.monotonic())) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                _kill_group(p.pid)
                p.wait()
    output = "".join(p.read_text(errors="replace") for p in logs)
    assert codes == [0, 0], f"torchrun exit codes {codes}:\n{output[-4000:]}"
    assert f"--local-addr {host_addr}" in output, "torchrun.sh did not pass LOCAL_ADDR"
    entry.check(output, world=2)
