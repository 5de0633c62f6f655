#!/bin/bash
# A real SLURM on this one machine, to try a job script before spending cluster hours (and what tests/test_slurm.py
# runs on). Debian's packages (apt-get install slurmctld slurmd slurm-client munge, SLURM 22.05); run as root.
#
#   slurm/local_cluster.sh up        # start munged, slurmctld and two slurmd nodes; prints what to export
#   export SLURM_CONF=$PWD/runs/slurm/slurm.conf
#   sbatch --gres=none --nodes 2 slurm/train.sbatch run.yaml
#   slurm/local_cluster.sh status    # the daemons and sinfo / squeue
#   slurm/local_cluster.sh down      # stop the daemons it started (by their pid files), nothing else
#
# Everything lives in LOCAL_SLURM_DIR (default runs/slurm): its own slurm.conf, munge key and socket, state, spool,
# logs and pid files, so it never reads or touches a site's /etc/slurm or munge. The nodes n1 and n2 are two slurmd
# processes (slurmd -N) with their own ports and NodeAddr=127.0.0.1: names that do not resolve, as on clusters where
# NodeName differs from the host name. Two partitions: `low` (default) is pre-emptible (PreemptType=
# preempt/partition_prio, PreemptMode=REQUEUE, GraceTime=LOCAL_SLURM_GRACE, default 60 s) by `high`.
# A requeued job may start again LOCAL_SLURM_REQUEUE_DELAY seconds later (default 30; SLURM's own default is 120).
# Ports: LOCAL_SLURM_PORT (default 16817) for slurmctld, the next two for the nodes.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
dir=$(realpath -m "${LOCAL_SLURM_DIR:-$root/runs/slurm}")
port=${LOCAL_SLURM_PORT:-16817}
grace=${LOCAL_SLURM_GRACE:-60}
# cred_expire: also how long a requeued job waits before it may start again (SLURM's default: 120 s)
requeue_delay=${LOCAL_SLURM_REQUEUE_DELAY:-30}
nodes=(n1 n2)
conf=$dir/slurm.conf
socket=$dir/munge/munge.socket

need() {
    for tool in munged mungekey slurmctld slurmd sinfo scontrol; do
        if ! command -v "$tool" >/dev/null; then
            echo "local_cluster.sh: $tool not found: apt-get install slurmctld slurmd slurm-client munge" >&2
            exit 2
        fi
    done
}

write_conf() {
    local cpus
    cpus=$(nproc)
    mkdir -p "$dir"/{state,spool,log,munge}
    chmod 700 "$dir/munge"
    cat >"$conf" <<EOF
# Written by slurm/local_cluster.sh: a two-node SLURM on this machine (see that script).
ClusterName=tinyflux-local
SlurmctldHost=$(hostname)(127.0.0.1)
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$socket,cred_expire=$requeue_delay
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool/%n
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.%n.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/linear
ReturnToService=2
JobRequeue=1
KillWait=$grace
MinJobAge=600
SlurmdTimeout=60
SchedulerParameters=sched_interval=2
SlurmdParameters=config_overrides
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
NodeName=n1 NodeAddr=127.0.0.1 Port=$((port + 1)) CPUs=$cpus State=UNKNOWN
NodeName=n2 NodeAddr=127.0.0.1 Port=$((port + 2)) CPUs=$cpus State=UNKNOWN
PartitionName=low Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=$grace
PartitionName=high Nodes=n1,n2 MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
EOF
}

alive() { [[ -f $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

up() {
    need
    if alive "$dir/slurmctld.pid"; then
        echo "already up (slurm/local_cluster.sh status); export SLURM_CONF=$conf"
        return 0
    fi
    write_conf
    if [[ ! -f $dir/munge/munge.key ]]; then
        mungekey --create --keyfile "$dir/munge/munge.key" --force
        chmod 600 "$dir/munge/munge.key"
    fi
    # --force: munged refuses to run as root otherwise; its own key, socket and files, never /etc/munge's.
    munged --force --socket "$socket" --key-file "$dir/munge/munge.key" --pid-file "$dir/munge/munged.pid" \
        --log-file "$dir/log/munged.log" --seed-file "$dir/munge/munged.seed"
    export SLURM_CONF=$conf
    slurmctld -f "$conf" -c  # -c: a clean start, no jobs from an earlier life of this directory
    for node in "${nodes[@]}"; do
        slurmd -f "$conf" -N "$node"
    done
    local deadline=$((SECONDS + 60))
    until [[ $(sinfo -h -o '%t' -p low 2>/dev/null | sort -u) == idle ]]; do
        if ((SECONDS > deadline)); then
            echo "local_cluster.sh: the nodes did not come up within 60 s; logs in $dir/log" >&2
            sinfo >&2 || true
            exit 1
        fi
        sleep 1
    done
    echo "up: 2 nodes (n1, n2), partitions low (default, pre-emptible, GraceTime=${grace}s) and high"
    echo "export SLURM_CONF=$conf"
}

down() {
    local pidfile stopped=0
    for pidfile in "$dir"/slurmd.*.pid "$dir/slurmctld.pid" "$dir/munge/munged.pid"; do
        if alive "$pidfile"; then
            kill "$(cat "$pidfile")"
            stopped=$((stopped + 1))
        fi
    done
    for pidfile in "$dir"/slurmd.*.pid "$dir/slurmctld.pid" "$dir/munge/munged.pid"; do
        for _ in $(seq 50); do
            alive "$pidfile" || break
            sleep 0.1
        done
        rm -f "$pidfile"
    done
    echo "down: stopped $stopped daemon(s) of $dir"
}

status() {
    local pidfile
    for pidfile in "$dir/munge/munged.pid" "$dir/slurmctld.pid" "$dir"/slurmd.*.pid; do
        if alive "$pidfile"; then echo "running: $(basename "$pidfile" .pid) (pid $(cat "$pidfile"))"; fi
    done
    if alive "$dir/slurmctld.pid"; then
        SLURM_CONF=$conf sinfo
        SLURM_CONF=$conf squeue
        echo "export SLURM_CONF=$conf"
    else
        echo "down"
        return 3
    fi
}

case "${1:-}" in
up) up ;;
down) down ;;
status) status ;;
*)
    echo "usage: slurm/local_cluster.sh up|down|status" >&2
    exit 2
    ;;
esac
