#!/usr/bin/env bash
# Stop the dev Slurm cluster: slurmd, slurmctld, slurmdbd, then MariaDB and munged.
#
# Idempotent. Each daemon is stopped by the pid in its pidfile and waited for.
# MariaDB and munged are stopped only if up.sh started them: on a laptop where the
# service manager runs them for other programs they are left alone.
# State (queued jobs, accounting) is kept: the next up.sh carries on from it.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
require_root
take_lock

stop_from_pidfile() { # NAME PIDFILE
    local pid
    if pid=$(pid_of "$2" "$1"); then
        stop_pid "$1" "$pid"
    else
        log "$1 not running"
    fi
    rm -f "$2"
}

# stop_if_ours NAME PIDFILE: stop NAME only if up.sh recorded that it started it.
stop_if_ours() {
    local name=$1 pidfile=$2 pid ours
    if ! pid=$(pid_of "$pidfile" "$name"); then
        log "$name not running"
    elif ours=$(tr -dc '0-9' <"$RUN_DIR/$name.pid" 2>/dev/null) && [[ $ours == "$pid" ]]; then
        stop_pid "$name" "$pid"
    else
        log "$name (pid $pid) was not started by up.sh: left running"
    fi
    rm -f "$RUN_DIR/$name.pid"
}

# Order matters: slurmd and slurmctld flush job records to slurmdbd, which needs
# MariaDB; everything needs munge.
stop_from_pidfile slurmd "$SLURMD_PIDFILE"
stop_from_pidfile slurmctld "$SLURMCTLD_PIDFILE"
stop_from_pidfile slurmdbd "$SLURMDBD_PIDFILE"
stop_if_ours mariadbd "$MYSQL_PIDFILE"
stop_if_ours munged "$MUNGE_PIDFILE"
printf 'slurm-dev down\n'
