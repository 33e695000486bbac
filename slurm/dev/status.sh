#!/usr/bin/env bash
# Print whether each daemon of the dev Slurm cluster is up; exit 0 only if all are
# and the node can run jobs. Read-only; needs no root.
set -uo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

all_up=0
report() { # NAME CHECK...
    local name=$1
    shift
    if "$@"; then
        printf '%-10s up\n' "$name"
    else
        printf '%-10s DOWN\n' "$name"
        all_up=1
    fi
}
report munged munge_ok
report mariadbd mysql_ok
report slurmdbd slurmdbd_ok
report slurmctld slurmctld_ok
report slurmd slurmd_ok
report node node_ok
printf '%-10s %s\n' "state" "$(hostname -s) $(node_state || true)"
printf '%-10s %s\n' "arraysize" "$(running_max_array_size || true)"
exit $all_up
