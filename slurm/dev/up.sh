#!/usr/bin/env bash
# Start (or bring back to health) the single-node dev Slurm cluster.
#
#   sudo slurm/dev/up.sh                                 # MaxArraySize=1001
#   sudo AULLM_DEV_MAX_ARRAY_SIZE=5 slurm/dev/up.sh      # force array splitting
#
# Idempotent: when every daemon is up, the config is current and the node is
# usable it returns at once. A different MaxArraySize restarts slurmctld (a
# reconfigure does not apply it, see common.sh); any other config change restarts
# slurmctld and slurmd. Jobs survive both: slurmctld saves its state on disk, and
# a job's slurmstepd outlives slurmd.
#
# Needs the packages from install.sh, and root. Prints one summary line on
# stdout; progress and errors go to stderr.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

START_NS=$(date +%s%N)
require_root

MAX_ARRAY_SIZE="${AULLM_DEV_MAX_ARRAY_SIZE:-$DEFAULT_MAX_ARRAY_SIZE}"
if ! [[ $MAX_ARRAY_SIZE =~ ^[0-9]+$ ]] || ((MAX_ARRAY_SIZE < 1 || MAX_ARRAY_SIZE > MAX_ARRAY_SIZE_LIMIT)); then
    die "AULLM_DEV_MAX_ARRAY_SIZE='$MAX_ARRAY_SIZE': allowed is an integer from 1 to $MAX_ARRAY_SIZE_LIMIT"
fi

for bin in munged mariadbd slurmdbd slurmctld slurmd sacctmgr scontrol sinfo sacct; do
    command -v "$bin" >/dev/null 2>&1 || PATH="$PATH:/usr/sbin:/sbin"
    command -v "$bin" >/dev/null 2>&1 || die "$bin not found: run $DEV_DIR/install.sh first"
done

NODE=$(hostname -s)
# nproc honours OMP_NUM_THREADS (a test pinning torch to one thread would shrink the
# node to one CPU); the CPUs this process may run on are what the node has.
CPUS=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc)
MEM_MB=$(awk '$1 == "MemTotal:" { print int($2 / 1024) }' /proc/meminfo)
# Leave the OS, MariaDB and the daemons room: 10 %, at least 512 MB. A RealMemory
# above what slurmd measures would drain the node ("Low RealMemory").
MARGIN_MB=$((MEM_MB / 10 > 512 ? MEM_MB / 10 : 512))
REAL_MEMORY=$((MEM_MB - MARGIN_MB))
((REAL_MEMORY > 0)) || die "only ${MEM_MB} MB of memory: too little for a Slurm node"

take_lock

# Every daemon below is started with fd 9 (the lock) closed: a daemon that
# inherited it would hold the lock for as long as it runs.

# ---------------------------------------------------------------- render config
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
sed -e "s/@CLUSTER_NAME@/$CLUSTER_NAME/g" -e "s/@HOSTNAME@/$NODE/g" -e "s/@CPUS@/$CPUS/g" \
    -e "s/@REAL_MEMORY@/$REAL_MEMORY/g" -e "s/@MAX_ARRAY_SIZE@/$MAX_ARRAY_SIZE/g" \
    "$DEV_DIR/slurm.conf.in" >"$TMP/slurm.conf"
sed -e "s/@DB_NAME@/$DB_NAME/g" -e "s/@DB_USER@/$DB_USER/g" -e "s/@DB_PASS@/$DB_PASS/g" \
    "$DEV_DIR/slurmdbd.conf.in" >"$TMP/slurmdbd.conf"

# Never overwrite a configuration someone else wrote (a laptop may already be a
# member of a real cluster); AULLM_DEV_FORCE=1 keeps a .bak copy and proceeds.
for conf in "$SLURM_CONF" "$SLURMDBD_CONF"; do
    if [[ -e $conf ]] && ! head -n 1 "$conf" | grep -qF "$MANAGED_MARKER"; then
        if [[ ${AULLM_DEV_FORCE:-0} == 1 ]]; then
            cp -p "$conf" "$conf.bak.$(date +%Y%m%d%H%M%S)"
            log "AULLM_DEV_FORCE=1: replacing $conf (backup kept next to it)"
        else
            die "$conf exists and was not written by up.sh; move it away or set AULLM_DEV_FORCE=1"
        fi
    fi
done

same_file() { cmp -s "$1" "$2"; }
# True when the two slurm.conf files differ in nothing but MaxArraySize, which
# only slurmctld reads: slurmd need not restart.
only_max_array_size_differs() {
    cmp -s <(grep -v '^MaxArraySize=' "$1") <(grep -v '^MaxArraySize=' "$2")
}

summary() {
    local how=$1 elapsed
    elapsed=$(awk -v a="$START_NS" -v b="$(date +%s%N)" 'BEGIN { printf "%.1f", (b - a) / 1e9 }')
    printf 'slurm-dev %s: cluster=%s node=%s cpus=%s real_memory=%sM partition=%s max_array_size=%s (%s s)\n' \
        "$how" "$CLUSTER_NAME" "$NODE" "$CPUS" "$REAL_MEMORY" "$PARTITION" "$(running_max_array_size)" "$elapsed"
}

# ------------------------------------------------------------------- fast path
if same_file "$TMP/slurm.conf" "$SLURM_CONF" && same_file "$TMP/slurmdbd.conf" "$SLURMDBD_CONF" &&
    munge_ok && mysql_ok && slurmdbd_ok && slurmd_ok && slurmctld_ok &&
    [[ $(running_max_array_size) == "$MAX_ARRAY_SIZE" ]] && array_limit_is "$MAX_ARRAY_SIZE" &&
    node_ok && sacct_ok; then
    summary "already up"
    exit 0
fi

# Daemons inherit the caller's working directory: never pin a test's temp dir.
cd /
mkdir -p "$STATE_DIR/slurmctld" "$STATE_DIR/slurmd" "$LOG_DIR" "$RUN_DIR" /etc/slurm

# ---------------------------------------------------------------- write config
SLURM_CONF_CHANGE=none # none | max_array_size | other
if ! same_file "$TMP/slurm.conf" "$SLURM_CONF"; then
    if [[ -e $SLURM_CONF ]] && only_max_array_size_differs "$TMP/slurm.conf" "$SLURM_CONF"; then
        SLURM_CONF_CHANGE=max_array_size
    else
        SLURM_CONF_CHANGE=other
    fi
    install -m 644 -o root -g root "$TMP/slurm.conf" "$SLURM_CONF"
    log "wrote $SLURM_CONF (node $NODE, $CPUS CPUs, ${REAL_MEMORY} MB, MaxArraySize=$MAX_ARRAY_SIZE)"
fi
DBD_CONF_CHANGED=0
if ! same_file "$TMP/slurmdbd.conf" "$SLURMDBD_CONF"; then
    DBD_CONF_CHANGED=1
    install -m 600 -o root -g root "$TMP/slurmdbd.conf" "$SLURMDBD_CONF"
    log "wrote $SLURMDBD_CONF"
fi

# ----------------------------------------------------------------------- munge
if ! munge_ok; then
    if [[ ! -s /etc/munge/munge.key ]]; then
        mkdir -p /etc/munge
        mungekey --create --keyfile=/etc/munge/munge.key 2>/dev/null ||
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
        log "created /etc/munge/munge.key"
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
    install -d -m 755 -o munge -g munge /run/munge
    # A socket or pidfile left by a killed munged makes the new one refuse to start.
    if ! pid_of "$MUNGE_PIDFILE" munged >/dev/null; then
        rm -f "$MUNGE_PIDFILE" "$MUNGE_SOCKET" "$MUNGE_SOCKET.lock"
        runuser -u munge -- munged </dev/null >/dev/null 2>&1 9>&- || die "munged failed to start (see /var/log/munge/munged.log)"
        wait_until 15 munge munge_ok || die "munge does not answer (see /var/log/munge/munged.log)"
        pid_of "$MUNGE_PIDFILE" munged >"$RUN_DIR/munged.pid" || true
        log "started munged"
    else
        wait_until 15 munge munge_ok || die "munged runs but does not answer"
    fi
fi

# --------------------------------------------------------------------- MariaDB
start_mariadb() {
    # --skip-networking: slurmdbd talks over the socket, and a laptop's own database
    # server on port 3306 cannot collide with this one.
    setsid -f mariadbd --user=mysql --skip-networking --socket="$MYSQL_SOCKET" \
        --pid-file="$MYSQL_PIDFILE" --log-error="$LOG_DIR/mariadb.log" </dev/null >/dev/null 2>&1 9>&-
}
if ! mysql_ok; then
    install -d -m 755 -o mysql -g root /run/mysqld
    # mariadbd writes its log as the mysql user, into a root-owned directory.
    touch "$LOG_DIR/mariadb.log"
    chown mysql: "$LOG_DIR/mariadb.log"
    # One that is still starting (or recovering after a crash) is waited for; one
    # that dies meanwhile is replaced, once.
    starts=0
    deadline=$((SECONDS + 90))
    until mysql_ok; do
        if ! pid_of "$MYSQL_PIDFILE" mariadbd >/dev/null && ! pgrep -x mariadbd >/dev/null; then
            ((starts < 2)) || break
            rm -f "$MYSQL_PIDFILE"
            start_mariadb
            starts=$((starts + 1))
        fi
        ((SECONDS < deadline)) || break
        sleep 0.2
    done
    mysql_ok || {
        tail_log "$LOG_DIR/mariadb.log"
        die "MariaDB did not answer on $MYSQL_SOCKET within 90 s"
    }
    if ((starts > 0)); then
        pid_of "$MYSQL_PIDFILE" mariadbd >"$RUN_DIR/mariadbd.pid" || true
        log "started mariadbd"
    fi
fi
mariadb --socket="$MYSQL_SOCKET" -e "
    CREATE DATABASE IF NOT EXISTS \`$DB_NAME\`;
    CREATE USER IF NOT EXISTS '$DB_USER'@'localhost' IDENTIFIED BY '$DB_PASS';
    GRANT ALL PRIVILEGES ON \`$DB_NAME\`.* TO '$DB_USER'@'localhost';" ||
    die "could not create database $DB_NAME and user $DB_USER"

# -------------------------------------------------------------------- slurmdbd
start_daemon() { # NAME PIDFILE LOGFILE: start a self-daemonising Slurm daemon, wait for its pidfile
    local name=$1 pidfile=$2 logfile=$3
    "$name" </dev/null >/dev/null 2>&1 9>&- || {
        tail_log "$logfile"
        die "$name failed to start"
    }
    # The command returns before the daemon has written its pidfile.
    wait_until 30 "$name pidfile" pid_of "$pidfile" "$name" >/dev/null || {
        tail_log "$logfile"
        die "$name wrote no live pid to $pidfile within 30 s"
    }
    log "started $name (pid $(pid_of "$pidfile" "$name"))"
}

if ((DBD_CONF_CHANGED)) && pid=$(pid_of "$SLURMDBD_PIDFILE" slurmdbd); then
    stop_pid slurmdbd "$pid"
fi
if ! slurmdbd_ok; then
    rm -f "$SLURMDBD_PIDFILE"
    start_daemon slurmdbd "$SLURMDBD_PIDFILE" "$LOG_DIR/slurmdbd.log"
fi
dbd_answers() { timeout 5 sacctmgr -n -P list cluster format=cluster >/dev/null 2>&1; }
wait_until 60 slurmdbd dbd_answers || {
    tail_log "$LOG_DIR/slurmdbd.log"
    die "slurmdbd does not answer sacctmgr within 60 s"
}
# sacctmgr reads slurm.conf (written above); without it this command hangs.
if ! timeout 10 sacctmgr -n -P list cluster format=cluster | grep -qx "$CLUSTER_NAME"; then
    timeout 30 sacctmgr -i add cluster "$CLUSTER_NAME" >/dev/null || die "sacctmgr add cluster $CLUSTER_NAME failed"
    log "registered cluster $CLUSTER_NAME in slurmdbd"
fi

# ---------------------------------------------------------- slurmctld / slurmd
# A running slurmctld must be restarted for a new MaxArraySize: `scontrol
# reconfigure` shows the new value but job validation keeps the old one (see
# array_limit_is). Its state is saved, so queued and running jobs carry on.
# slurmd is restarted only for other changes (nodes, partitions, plugins).
RESTART_CTLD=0
if [[ $SLURM_CONF_CHANGE != none ]]; then
    RESTART_CTLD=1
elif slurmctld_ok && array_limit_stale "$MAX_ARRAY_SIZE"; then
    log "slurmctld enforces a stale MaxArraySize: restarting it"
    RESTART_CTLD=1
fi
if [[ $SLURM_CONF_CHANGE == other ]] && pid=$(pid_of "$SLURMD_PIDFILE" slurmd); then
    stop_pid slurmd "$pid"
fi
if ((RESTART_CTLD)) && pid=$(pid_of "$SLURMCTLD_PIDFILE" slurmctld); then
    stop_pid slurmctld "$pid"
fi
if ! pid_of "$SLURMCTLD_PIDFILE" slurmctld >/dev/null; then
    rm -f "$SLURMCTLD_PIDFILE"
    start_daemon slurmctld "$SLURMCTLD_PIDFILE" "$LOG_DIR/slurmctld.log"
fi
wait_until 60 slurmctld slurmctld_ok || {
    tail_log "$LOG_DIR/slurmctld.log"
    die "slurmctld does not answer scontrol ping within 60 s"
}
if ! slurmd_ok; then
    rm -f "$SLURMD_PIDFILE"
    start_daemon slurmd "$SLURMD_PIDFILE" "$LOG_DIR/slurmd.log"
fi

# ------------------------------------------------------------------ readiness
# A node drained or set down by an earlier mishap (a job that could not be
# killed, a restart during a launch) is not released by ReturnToService: resume
# it, once. "down*" (slurmd not heard from yet) only needs time.
RESUMED=0
node_ready() {
    local state
    state=$(node_state)
    case $state in
        idle | mixed | allocated | completing) return 0 ;;
        drain | drained | draining | down)
            if ((!RESUMED)); then
                log "node $NODE is '$state': resuming it"
                timeout 10 scontrol update nodename="$NODE" state=resume 2>/dev/null || true
                RESUMED=1
            fi
            ;;
    esac
    return 1
}
wait_until 60 "node $NODE" node_ready || {
    timeout 10 scontrol show node "$NODE" | grep -E 'State=|Reason=' >&2 || true
    tail_log "$LOG_DIR/slurmd.log"
    die "node $NODE is '$(node_state)', not idle, after 60 s"
}
max_array_size_applied() { [[ $(running_max_array_size) == "$MAX_ARRAY_SIZE" ]] && array_limit_is "$MAX_ARRAY_SIZE"; }
wait_until 30 MaxArraySize max_array_size_applied ||
    die "slurmctld reports MaxArraySize=$(running_max_array_size) and does not enforce $MAX_ARRAY_SIZE"
wait_until 60 sacct sacct_ok || die "sacct does not answer within 60 s (see $LOG_DIR/slurmdbd.log)"

summary "up"
