#!/usr/bin/env bash
# A real single-node Slurm cluster on this machine (Debian's slurmctld + slurmd + munge), for the
# tests and for trying the sbatch scripts before a cluster:
#
#   bash slurm/local_cluster.sh start     # installs the packages if needed (root + apt), starts it
#   export SLURM_CONF=/tmp/efficientllm-slurm/slurm.conf    # printed by start
#   sbatch --export=ALL,MODEL_ARGS="..." slurm/pretrain_1b.sbatch
#   bash slurm/local_cluster.sh stop
#
# No systemd or cgroups: proctrack/linuxproc, task/none, no accounting. Everything lives under
# $SLURM_LOCAL_DIR (default /tmp/efficientllm-slurm); the system's /etc/slurm is never touched.
set -euo pipefail
DIR=${SLURM_LOCAL_DIR:-/tmp/efficientllm-slurm}
CONF="$DIR/slurm.conf"
export SLURM_CONF="$CONF"

die() { echo "local_cluster: $*" >&2; exit 1; }

install_packages() {
    command -v slurmctld >/dev/null 2>&1 && command -v munged >/dev/null 2>&1 && return 0
    [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1 \
        || die "slurmctld/slurmd/munge are missing: apt-get install slurmctld slurmd slurm-client munge"
    echo "local_cluster: installing slurmctld slurmd slurm-client munge (apt)"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        slurmctld slurmd slurm-client munge >/dev/null
}

start_munge() {
    if pgrep -x munged >/dev/null 2>&1; then return 0; fi
    mkdir -p /etc/munge /var/lib/munge /var/log/munge /run/munge
    if [ ! -s /etc/munge/munge.key ]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
    if id munge >/dev/null 2>&1; then
        chown -R munge:munge /etc/munge /var/lib/munge /var/log/munge /run/munge
        chmod 0400 /etc/munge/munge.key
        su -s /bin/sh munge -c "munged" || die "munged did not start"
    else
        chmod 0400 /etc/munge/munge.key
        munged --force || die "munged did not start"
    fi
}

write_conf() {
    local host node
    host=$(hostname -s)
    # the node as slurmd sees it (CPUs, sockets, memory), minus a little memory headroom
    node=$(slurmd -C | head -n 1 | sed -E "s/NodeName=[^ ]+/NodeName=$host/; s/RealMemory=([0-9]+)/RealMemory=\1/")
    local mem
    mem=$(echo "$node" | sed -nE 's/.*RealMemory=([0-9]+).*/\1/p')
    node=$(echo "$node" | sed -E "s/RealMemory=[0-9]+/RealMemory=$((mem * 9 / 10))/")
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
    cat > "$CONF" <<EOF
ClusterName=local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
SlurmctldPort=${SLURMCTLD_PORT:-6817}
SlurmdPort=${SLURMD_PORT:-6818}
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdTimeout=300
KillWait=60
$node State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
EOF
}

wait_idle() {
    for _ in $(seq 1 60); do
        state=$(sinfo -h -o '%T' 2>/dev/null | head -n 1 || true)
        case "$state" in idle|mixed|allocated) return 0 ;; esac
        sleep 0.5
    done
    die "the node did not come up (state '${state:-none}'); see $DIR/log/"
}

start() {
    install_packages
    if [ -f "$DIR/slurmctld.pid" ] && kill -0 "$(cat "$DIR/slurmctld.pid")" 2>/dev/null; then
        echo "local_cluster: already running"
    else
        start_munge
        write_conf
        slurmctld -f "$CONF" -i || die "slurmctld did not start; see $DIR/log/slurmctld.log"
        slurmd -f "$CONF" || die "slurmd did not start; see $DIR/log/slurmd.log"
    fi
    wait_idle
    echo "local_cluster: up ($(sinfo -h -o '%N %c CPUs %m MB')); export SLURM_CONF=$CONF"
}

stop() {
    for daemon in slurmd slurmctld; do
        if [ -f "$DIR/$daemon.pid" ]; then
            pid=$(cat "$DIR/$daemon.pid")
            kill "$pid" 2>/dev/null || true
            for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
            kill -9 "$pid" 2>/dev/null || true
            rm -f "$DIR/$daemon.pid"
        fi
    done
    echo "local_cluster: stopped"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) sinfo && squeue ;;
    *) die "usage: $0 start|stop|status" ;;
esac
