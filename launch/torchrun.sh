#!/usr/bin/env bash
# Launch training on this node with torchrun (c10d rendezvous). Run the same command on every node.
#
#   launch/torchrun.sh                                        # one node, NPROC_PER_NODE ranks
#   launch/torchrun.sh --train.steps=100                      # extra arguments go to the entry point
#   NNODES=2 RDZV_ENDPOINT=node0:29500 launch/torchrun.sh     # on node0 and on node1
#   CONFIG= ENTRY=tools/dist_check.py launch/torchrun.sh      # check the launch without training
#
# Environment (defaults in brackets):
#   NNODES          number of nodes [1]; "MIN:MAX" for elastic
#   NPROC_PER_NODE  ranks per node [visible GPUs (CUDA_VISIBLE_DEVICES or nvidia-smi), or 1 without GPUs]
#   RDZV_ENDPOINT   host:port of the rendezvous, any one node [$MASTER_ADDR:$MASTER_PORT, 127.0.0.1:29500]
#   RDZV_ID         rendezvous id, the same on every node of one run [rlad]
#   RDZV_CONF       extra rendezvous settings, e.g. is_host=1 on the endpoint node when its hostname
#                   does not resolve to RDZV_ENDPOINT's address []
#   NODE_RANK       fix this node's rank (optional; c10d assigns ranks otherwise) []
#   LOCAL_ADDR      address other nodes reach this node on (torchrun --local-addr) []
#   CONFIG          YAML config passed as --config; empty to pass none [launch/configs/tiny_cpu.yaml]
#   ENTRY           what torchrun runs: "-m module" or a script path [-m rlad_megatron.train]
#   PYTHON          interpreter that has torch and rlad_megatron [python]
#   LOG_DIR         if set, torchrun writes each rank's stdout/stderr under it (and still prints them) []
set -euo pipefail

NNODES=${NNODES:-1}
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
    NPROC_PER_NODE=1
    if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
        IFS=, read -r -a visible <<< "$CUDA_VISIBLE_DEVICES"
        NPROC_PER_NODE=${#visible[@]}
    elif command -v nvidia-smi >/dev/null 2>&1; then
        NPROC_PER_NODE=$(nvidia-smi --list-gpus 2>/dev/null | wc -l)
        [[ "$NPROC_PER_NODE" -gt 0 ]] || NPROC_PER_NODE=1
    fi
fi
RDZV_ENDPOINT=${RDZV_ENDPOINT:-${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-29500}}
RDZV_ID=${RDZV_ID:-rlad}
CONFIG=${CONFIG-launch/configs/tiny_cpu.yaml}
ENTRY=${ENTRY:-"-m rlad_megatron.train"}
PYTHON=${PYTHON:-python}
# megatron-core overlaps TP communication with compute only when kernels queue in order (Megatron-LM sets it too).
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}

read -r -a entry <<< "$ENTRY"
extra=()
[[ -n "${NODE_RANK:-}" ]] && extra+=(--node-rank "$NODE_RANK")
[[ -n "${LOCAL_ADDR:-}" ]] && extra+=(--local-addr "$LOCAL_ADDR")
[[ -n "${RDZV_CONF:-}" ]] && extra+=(--rdzv-conf "$RDZV_CONF")
[[ -n "${LOG_DIR:-}" ]] && extra+=(--log-dir "$LOG_DIR" --tee 3)
config=()
[[ -n "$CONFIG" ]] && config=(--config "$CONFIG")

set -x
exec "$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --nproc-per-node "$NPROC_PER_NODE" \
    --rdzv-backend c10d --rdzv-endpoint "$RDZV_ENDPOINT" --rdzv-id "$RDZV_ID" "${extra[@]}" \
    "${entry[@]}" "${config[@]}" "$@"
