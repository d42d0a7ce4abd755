#!/usr/bin/env bash
# A throw-away two-node Slurm cluster on localhost, without systemd (for tests and for trying
# launch/slurm.sbatch on one machine). Needs root and Debian's slurm-wlm + munge
# (launch/cluster/install_deps.sh).
#
#   launch/cluster/slurm_local.sh up   STATE_DIR   # munged, slurmctld, slurmd n1 + n2; prints `export SLURM_CONF=...`
#   launch/cluster/slurm_local.sh down STATE_DIR   # cancels jobs, stops every daemon by the PID it recorded
#
# Ports: SLURMCTLD_PORT (default 6817) and SLURMD_PORT (default 6818; n2 uses SLURMD_PORT+1).
# Finished jobs stay visible to `scontrol show job` for MinJobAge (an hour): there is no slurmdbd/sacct.
set -euo pipefail

cmd=${1:-}
state=${2:-}
if [[ -z "$cmd" || -z "$state" ]]; then
    echo "usage: $0 up|down STATE_DIR" >&2
    exit 2
fi
mkdir -p "$state"
state=$(cd "$state" && pwd)
conf="$state/slurm.conf"

# Start a daemon in the foreground in its own session, so that its PID is also its process group
# and `down` can stop it (and anything it forked) with one kill.
start_daemon() {
    local name=$1
    shift
    setsid "$@" >"$state/log/$name.stdout" 2>&1 < /dev/null &
    echo $! > "$state/pids/$name"
}

stop_daemon() {
    local pidfile=$1 pid
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 50); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL -- "-$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
}

wait_for() {
    local what=$1 tries=$2
    shift 2
    for _ in $(seq "$tries"); do
        if "$@" >/dev/null 2>&1; then
            return 0
        fi
        sleep 0.2
    done
    echo "slurm_local.sh: timed out waiting for $what; logs in $state/log" >&2
    tail -n 20 "$state"/log/* >&2 || true
    return 1
}

nodes_idle() {
    [[ "$(sinfo -h -N -o '%t' | sort -u | tr -d '\n')" == "idle" ]]
}

up() {
    for tool in munged mungekey slurmctld slurmd scontrol sinfo; do
        command -v "$tool" >/dev/null || { echo "slurm_local.sh: $tool not found; run launch/cluster/install_deps.sh" >&2; exit 1; }
    done
    if [[ -n "$(ls -A "$state/pids" 2>/dev/null)" ]]; then
        echo "slurm_local.sh: $state/pids is not empty; run '$0 down $state' first" >&2
        exit 1
    fi
    mkdir -p "$state/munge" "$state/log" "$state/pids" "$state/ctld" "$state/spool"
    # munged refuses keys and sockets in group/world-writable places, but clients (slurmstepd,
    # srun) must reach the socket: root-owned 0700 key, 0755 socket directory.
    chmod 755 "$state" "$state/munge"
    if [[ ! -f "$state/munge/munge.key" ]]; then
        mungekey --create --keyfile="$state/munge/munge.key"
    fi
    chmod 600 "$state/munge/munge.key"
    local socket="$state/munge/munge.socket"
    start_daemon munged munged --foreground --force --socket="$socket" \
        --key-file="$state/munge/munge.key" --pid-file="$state/munge/munged.pid" \
        --seed-file="$state/munge/munged.seed" --log-file="$state/log/munged.log"
    wait_for munged 50 test -S "$socket"

    local ctld_port=${SLURMCTLD_PORT:-6817} d_port=${SLURMD_PORT:-6818}
    cat > "$conf" <<EOF
ClusterName=rladlocal
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$socket
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/spool/%n
SlurmctldPidFile=$state/ctld/slurmctld.pid
SlurmdPidFile=$state/spool/slurmd-%n.pid
SlurmctldLogFile=$state/log/slurmctld.log
SlurmdLogFile=$state/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
SchedulerType=sched/backfill
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
ReturnToService=2
MinJobAge=3600
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
NodeName=n[1-2] NodeHostname=localhost NodeAddr=127.0.0.1 Port=[$d_port-$((d_port + 1))] CPUs=$(nproc) State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
    export SLURM_CONF="$conf"
    start_daemon slurmctld slurmctld -D -i -f "$conf"
    wait_for slurmctld 100 scontrol ping
    start_daemon slurmd-n1 slurmd -D -N n1 -f "$conf"
    start_daemon slurmd-n2 slurmd -D -N n2 -f "$conf"
    wait_for "both nodes idle" 150 nodes_idle
    echo "export SLURM_CONF=$conf"
}

down() {
    if [[ -f "$conf" ]]; then
        export SLURM_CONF="$conf"
        if [[ -f "$state/pids/slurmctld" ]] && kill -0 "$(cat "$state/pids/slurmctld")" 2>/dev/null; then
            # Let slurmd kill job steps through proctrack before the daemons go away.
            scancel --full --quiet "--user=$(id -un)" 2>/dev/null || true
            for _ in $(seq 30); do
                [[ -z "$(squeue -h -o %i 2>/dev/null)" ]] && break
                sleep 0.2
            done
        fi
    fi
    for name in slurmd-n1 slurmd-n2 slurmctld munged; do
        [[ -f "$state/pids/$name" ]] && stop_daemon "$state/pids/$name"
    done
    return 0
}

case "$cmd" in
    up) up ;;
    down) down ;;
    *) echo "usage: $0 up|down STATE_DIR" >&2; exit 2 ;;
esac
