#!/bin/bash
# A one-node Slurm on this machine, to try the scripts of this folder without a cluster (and for
# tests/test_slurm_real.py): Debian's slurmctld, slurmd, slurm-client and munge, installed with
# apt-get when missing, all daemons run as root, this machine's CPUs as one node in one partition.
# No GPUs: submit with --gpus-per-node=0 and resources that fit (see README.md).
#
#   examples/slurm/local-cluster.sh start    install if needed, configure, start; waits until the node is idle
#   examples/slurm/local-cluster.sh stop     cancel every job, stop what start started, remove its config
#   examples/slurm/local-cluster.sh status   sinfo and squeue; exit 1 when the cluster is not running
#
# start and stop are idempotent. start writes /etc/slurm/slurm.conf (so sbatch, squeue, ... need no
# SLURM_CONF) and refuses to touch one it did not write. State and logs: $DPO_LOCAL_SLURM_STATE
# (default /var/lib/dpo-local-slurm).
# Exit codes: 0 done; 1 failed (the daemons' logs are printed); 2 usage; 69 this machine cannot run
# it (not root, no apt-get, packages that do not install, another Slurm's config): the reason is printed.
set -euo pipefail

STATE=${DPO_LOCAL_SLURM_STATE:-/var/lib/dpo-local-slurm}
CONF=/etc/slurm/slurm.conf
MARK="# Written by dpo examples/slurm/local-cluster.sh; 'local-cluster.sh stop' removes it."
PACKAGES=(slurmctld slurmd slurm-client munge)

say() { echo "local-cluster: $*" >&2; }
unavailable() { say "cannot run here: $*"; exit 69; }

require_root() {
    if [[ $(id -u) != 0 ]]; then
        unavailable "it must run as root (it installs packages and starts Slurm's daemons as root)"
    fi
}

install_packages() {
    local missing=() pkg
    for pkg in "${PACKAGES[@]}"; do
        if [[ $(dpkg-query -W -f '${Status}' "$pkg" 2>/dev/null) != "install ok installed" ]]; then
            missing+=("$pkg")
        fi
    done
    if (( ${#missing[@]} == 0 )); then
        return
    fi
    if ! command -v apt-get > /dev/null; then
        unavailable "${missing[*]} not installed and no apt-get to install them (a Debian or Ubuntu machine is needed)"
    fi
    say "installing ${missing[*]} (apt-get; log in $STATE/apt.log)"
    local apt=(env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${missing[@]}")
    # A fresh machine may have no package lists yet: update once, only when the install needs it.
    if ! "${apt[@]}" > "$STATE/apt.log" 2>&1; then
        if ! { apt-get update && "${apt[@]}"; } >> "$STATE/apt.log" 2>&1; then
            tail -n 5 "$STATE/apt.log" >&2
            unavailable "apt-get could not install ${missing[*]} (see $STATE/apt.log)"
        fi
    fi
}

config_text() {
    local host cpus memory
    host=$(hostname -s)
    # slurmd -C prints this machine's node line; its CPU count and memory are what slurmd will check.
    cpus=$(slurmd -C | sed -n 's/.* CPUs=\([0-9]*\).*/\1/p')
    memory=$(slurmd -C | sed -n 's/.* RealMemory=\([0-9]*\).*/\1/p')
    cat << EOF
$MARK
ClusterName=dpo-local
SlurmctldHost=$host(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/slurmctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/slurmctld.log
SlurmdLogFile=$STATE/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$memory State=UNKNOWN
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

alive() {  # alive PIDFILE: the daemon that wrote PIDFILE still runs (a daemon removes it as it exits)
    local pid
    pid=$(cat "$1" 2> /dev/null) && kill -0 "$pid" 2> /dev/null
}

ours() {
    [[ -f $CONF ]] && [[ $(head -n 1 "$CONF") == "$MARK" ]]
}

start_munge() {
    if munge -n > /dev/null 2>&1; then
        return  # a munged is already running (this script's or the system's): use it
    fi
    if [[ ! -s /etc/munge/munge.key ]]; then
        runuser -u munge -- mungekey --create
    fi
    install -d -o munge -g munge -m 0755 /run/munge
    runuser -u munge -- /usr/sbin/munged
    touch "$STATE/started-munged"
    local _
    for _ in {1..50}; do
        if munge -n > /dev/null 2>&1; then
            return
        fi
        sleep 0.1
    done
    say "munged did not start"
    exit 1
}

show_logs() {
    local log
    for log in "$STATE"/slurmctld.log "$STATE"/slurmd.log; do
        if [[ -f $log ]]; then
            say "last lines of $log:"
            tail -n 15 "$log" >&2
        fi
    done
}

wait_idle() {
    local state="" _
    for _ in {1..60}; do
        state=$(sinfo -h -N -o %T 2> /dev/null || true)
        if [[ $state == idle || $state == mixed || $state == allocated ]]; then
            return
        fi
        sleep 0.5
    done
    say "the node did not come up (state: ${state:-no answer from slurmctld})"
    show_logs
    exit 1
}

start() {
    require_root
    if [[ -f $CONF ]] && ! ours; then
        unavailable "$CONF exists and was not written by this script (a Slurm is configured here already)"
    fi
    mkdir -p "$STATE/slurmctld" "$STATE/slurmd"
    install_packages
    local text
    text=$(config_text)
    if [[ -f $CONF && $(cat "$CONF") != "$text" ]]; then
        say "the configuration changed: restarting"
        stop_daemons
    fi
    printf '%s\n' "$text" > "$CONF"
    start_munge
    if ! alive "$STATE/slurmctld.pid"; then
        slurmctld || { show_logs; exit 1; }
    fi
    if ! alive "$STATE/slurmd.pid"; then
        slurmd || { show_logs; exit 1; }
    fi
    wait_idle
    say "running: $(slurmctld -V), node $(hostname -s) with $(sinfo -h -o %c) CPUs, partition local"
}

stop_daemons() {
    local pidfile _
    for pidfile in "$STATE/slurmd.pid" "$STATE/slurmctld.pid"; do
        if alive "$pidfile"; then
            kill "$(cat "$pidfile")"
            for _ in {1..100}; do
                alive "$pidfile" || break
                sleep 0.1
            done
        fi
    done
}

stop() {
    require_root
    if ! ours; then
        say "not running (no $CONF written by this script)"
        return
    fi
    if alive "$STATE/slurmctld.pid"; then
        # Cancelled jobs get SIGTERM, then SIGKILL after KillWait (30 s): wait for them to be gone,
        # so that no job process outlives the daemons.
        squeue -h -o %A | xargs -r scancel 2> /dev/null || true
        local _
        for _ in {1..90}; do
            [[ -z $(squeue -h -o %A 2> /dev/null) ]] && break
            sleep 0.5
        done
    fi
    stop_daemons
    if [[ -e $STATE/started-munged ]] && alive /run/munge/munged.pid; then
        kill "$(cat /run/munge/munged.pid)"
    fi
    rm -f "$CONF"
    rm -rf "$STATE"
    say "stopped"
}

status() {
    if ! ours || ! alive "$STATE/slurmctld.pid"; then
        say "not running"
        exit 1
    fi
    sinfo
    squeue
}

case ${1:-} in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
