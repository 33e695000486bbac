#!/usr/bin/env bash
# Install the packages of the single-node dev Slurm cluster (Debian/Ubuntu, apt).
#
# Idempotent: when every package is already installed it returns in well under a
# second without touching apt (tests call it on every session).
# Needs root; run it as root or with sudo.
set -euo pipefail

PACKAGES=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)

log() { printf '[slurm-dev install] %s\n' "$*" >&2; }

missing=()
for pkg in "${PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    [[ "$status" == "install ok installed" ]] || missing+=("$pkg")
done

if ((${#missing[@]} == 0)); then
    log "all packages present: ${PACKAGES[*]}"
    exit 0
fi

if [[ $(id -u) -ne 0 ]]; then
    log "missing packages (${missing[*]}) and not root: run 'sudo $0'"
    exit 1
fi
if ! command -v apt-get >/dev/null 2>&1; then
    log "missing packages (${missing[*]}) and apt-get is not available (Debian/Ubuntu only)"
    exit 1
fi

export DEBIAN_FRONTEND=noninteractive
log "installing: ${missing[*]}"
# A fresh container has empty package lists; only refresh them when we must install.
apt-get update -qq
# Install the whole set (not just the missing ones) so the versions stay consistent.
apt-get install -y -qq --no-install-recommends \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
    "${PACKAGES[@]}" >/dev/null
log "installed: ${PACKAGES[*]}"
