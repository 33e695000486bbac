# Shared by up.sh, down.sh and status.sh (sourced, not executed).
#
# Where things live. Everything is a fixed system path because the Slurm client
# commands (sbatch, sacct, ... and submitit, which calls them) read
# /etc/slurm/slurm.conf: a private config directory would need SLURM_CONF set in
# every process that talks to the cluster.

DEV_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

CLUSTER_NAME="aullm-dev"
PARTITION="debug"
DEFAULT_MAX_ARRAY_SIZE=1001
# MaxArraySize must be at least 1; Slurm caps it at 4000001.
MAX_ARRAY_SIZE_LIMIT=4000001

SLURM_CONF=/etc/slurm/slurm.conf
SLURMDBD_CONF=/etc/slurm/slurmdbd.conf
MANAGED_MARKER="# Managed by aullm-grid slurm/dev/up.sh"

STATE_DIR=/var/lib/slurm
LOG_DIR=/var/log/slurm
# Records which daemons up.sh started itself, so that down.sh does not stop a
# munged or MariaDB that the host's service manager runs for other users.
RUN_DIR=/run/aullm-slurm-dev
LOCK_FILE=/run/lock/aullm-slurm-dev.lock

MUNGE_SOCKET=/run/munge/munge.socket.2
MUNGE_PIDFILE=/run/munge/munged.pid
MYSQL_SOCKET=/run/mysqld/mysqld.sock
MYSQL_PIDFILE=/run/mysqld/mysqld.pid
SLURMDBD_PIDFILE=/run/slurmdbd.pid
SLURMCTLD_PIDFILE=/run/slurmctld.pid
SLURMD_PIDFILE=/run/slurmd.pid

DB_NAME=slurm_acct_db
DB_USER=slurm
DB_PASS=slurmpass

log() { printf '[slurm-dev] %s\n' "$*" >&2; }
die() {
    log "ERROR: $*"
    exit 1
}

require_root() {
    [[ $(id -u) -eq 0 ]] || die "must run as root (try: sudo $0)"
}

# Take the cluster-wide lock so that two test sessions (or a test and a user)
# never start, reconfigure or stop the daemons at the same time.
take_lock() {
    mkdir -p "$(dirname "$LOCK_FILE")"
    exec 9>"$LOCK_FILE"
    flock -w 300 9 || die "another up.sh/down.sh held $LOCK_FILE for 300 s"
}

# pid_of PIDFILE COMM: print the pid if the pidfile names a live process whose
# command name is COMM (a stale pidfile after a crash or reboot names nothing,
# or a recycled pid that belongs to something else).
pid_of() {
    local pidfile=$1 comm=$2 pid
    [[ -r $pidfile ]] || return 1
    pid=$(tr -dc '0-9' <"$pidfile")
    [[ -n $pid && -r /proc/$pid/stat ]] || return 1
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$comm" ]] || return 1
    # A killed daemon stays a zombie until its parent reaps it: that is not running.
    [[ $(awk '{ sub(/^.*\) /, ""); print $1 }' "/proc/$pid/stat" 2>/dev/null) != Z ]] || return 1
    printf '%s\n' "$pid"
}

munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
# ping answers 0 even when access is denied: it only asks whether the server runs.
mysql_ok() { mariadb-admin --socket="$MYSQL_SOCKET" ping >/dev/null 2>&1; }
slurmdbd_ok() { pid_of "$SLURMDBD_PIDFILE" slurmdbd >/dev/null; }
slurmctld_ok() { timeout 10 scontrol ping 2>/dev/null | grep -q 'is UP'; }
slurmd_ok() { pid_of "$SLURMD_PIDFILE" slurmd >/dev/null; }

# The node's state as sinfo prints it (idle, mixed, idle*, down*, drained, ...).
node_state() { timeout 10 sinfo -h -N -n "$(hostname -s)" -o %T 2>/dev/null | head -n 1; }

# A node that can run jobs: idle, or busy with other people's jobs. A trailing
# '*' means slurmctld cannot reach slurmd.
node_ok() {
    case "$(node_state)" in
        idle | mixed | allocated | completing) return 0 ;;
        *) return 1 ;;
    esac
}

sacct_ok() { timeout 15 sacct -n -X -S now-1minutes -o JobID >/dev/null 2>&1; }

running_max_array_size() {
    timeout 10 scontrol show config 2>/dev/null | awk '$1 == "MaxArraySize" { print $3 }'
}

# array_limit_is N: slurmctld really enforces MaxArraySize=N. `scontrol show config`
# is not enough: slurmctld caches the limit at the first array submission and
# `scontrol reconfigure` does not refresh that cache (Slurm 22.05), so the one
# proof is what job validation says. --test-only submits nothing.
array_limit_is() {
    local n=$1 out
    timeout 15 sbatch --test-only --array="$((n - 1))" --output=/dev/null --wrap true >/dev/null 2>&1 || return 1
    out=$(timeout 15 sbatch --test-only --array="$n" --output=/dev/null --wrap true 2>&1) && return 1
    grep -q 'Invalid job array specification' <<<"$out"
}

# array_limit_stale N: slurmctld demonstrably enforces a limit other than N (a
# probe that fails for another reason, e.g. a node still down, proves nothing).
array_limit_stale() {
    local n=$1 out
    timeout 15 sbatch --test-only --array="$n" --output=/dev/null --wrap true >/dev/null 2>&1 && return 0
    out=$(timeout 15 sbatch --test-only --array="$((n - 1))" --output=/dev/null --wrap true 2>&1) && return 1
    grep -q 'Invalid job array specification' <<<"$out"
}

# wait_until SECONDS WHAT CMD...: poll CMD every 0.2 s until it succeeds.
wait_until() {
    local seconds=$1 what=$2
    shift 2
    local deadline=$((SECONDS + seconds))
    until "$@"; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

# stop_pid NAME PID: SIGTERM, then wait up to 30 s (SIGKILL after that).
stop_pid() {
    local name=$1 pid=$2 i
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 150; i++)); do
        kill -0 "$pid" 2>/dev/null || {
            log "stopped $name (pid $pid)"
            return 0
        }
        sleep 0.2
    done
    log "$name (pid $pid) ignored SIGTERM for 30 s: SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    sleep 0.5
}

# tail_log FILE: the end of a daemon's log, for error messages.
tail_log() { [[ -r $1 ]] && tail -n 15 "$1" | sed 's/^/    /' >&2 || true; }
