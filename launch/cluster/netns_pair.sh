#!/usr/bin/env bash
# Two "nodes" on one machine: network namespaces <NAME>a and <NAME>b joined by a veth pair, so a
# multi-node torchrun (gloo over the veth) can be tried without a second machine. Needs root.
#
#   launch/cluster/netns_pair.sh up   NAME   # prints the two addresses and interface names
#   launch/cluster/netns_pair.sh down NAME   # deletes both namespaces (the veth pair goes with them)
#
#   ip netns exec NAMEa env NNODES=2 RDZV_ENDPOINT=10.231.0.1:29500 RDZV_CONF=is_host=1 \
#       LOCAL_ADDR=10.231.0.1 GLOO_SOCKET_IFNAME=NAMEa launch/torchrun.sh
#   ip netns exec NAMEb env NNODES=2 RDZV_ENDPOINT=10.231.0.1:29500 RDZV_CONF=is_host=0 \
#       LOCAL_ADDR=10.231.0.2 GLOO_SOCKET_IFNAME=NAMEb launch/torchrun.sh
#
# Both namespaces share the host's hostname, so torchrun cannot tell from it which one hosts the
# rendezvous: is_host and --local-addr say it explicitly. NAME is at most 14 characters (Linux
# interface names are limited to 15) and SUBNET (default 10.231.0) the first three octets of a /24.
set -euo pipefail

cmd=${1:-}
name=${2:-}
subnet=${SUBNET:-10.231.0}
if [[ -z "$cmd" || -z "$name" || ${#name} -gt 14 ]]; then
    echo "usage: $0 up|down NAME   (NAME at most 14 characters)" >&2
    exit 2
fi

up() {
    ip netns add "${name}a"
    ip netns add "${name}b"
    ip link add "${name}a" type veth peer name "${name}b"
    local i=1
    for side in a b; do
        ip link set "${name}${side}" netns "${name}${side}"
        ip -n "${name}${side}" addr add "${subnet}.${i}/24" dev "${name}${side}"
        ip -n "${name}${side}" link set "${name}${side}" up
        ip -n "${name}${side}" link set lo up
        echo "${name}${side} ${subnet}.${i} ${name}${side}"
        i=$((i + 1))
    done
}

down() {
    # Deleting a namespace does not end processes still inside it: kill those first, by PID.
    local ns pid
    for ns in "${name}a" "${name}b"; do
        if ip netns list | grep -qw "$ns"; then
            for pid in $(ip netns pids "$ns"); do
                kill -KILL "$pid" 2>/dev/null || true
            done
            ip netns del "$ns"
        fi
    done
}

case "$cmd" in
    up) up ;;
    down) down ;;
    *) echo "usage: $0 up|down NAME" >&2; exit 2 ;;
esac
