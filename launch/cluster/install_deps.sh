#!/usr/bin/env bash
# Install what launch/cluster/{slurm_local,netns_pair}.sh need, on Debian/Ubuntu, as root:
# Slurm (slurmctld, slurmd, client tools, basic plugins), munge and iproute2. Skips what is there.
set -euo pipefail

need=()
for pair in slurmctld:slurm-wlm slurmd:slurm-wlm sbatch:slurm-wlm munged:munge mungekey:munge ip:iproute2; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair##*:}")
done
if [[ ${#need[@]} -eq 0 ]]; then
    exit 0
fi
mapfile -t need < <(printf '%s\n' "${need[@]}" | sort -u)
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install_deps.sh: apt-get not found; install ${need[*]} with this system's package manager" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${need[@]}"
