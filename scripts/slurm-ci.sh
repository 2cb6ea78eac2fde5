#!/usr/bin/env bash
# A real one-node SLURM cluster for the tests (Debian's slurm-wlm + munge), in a scratch folder.
#
#   scripts/slurm-ci.sh start DIR   install munge + slurm-wlm if absent (apt, as root), write DIR/slurm.conf,
#                                   start munged, slurmctld and slurmd (pid files in DIR), wait until the
#                                   node is idle; prints `export SLURM_CONF=DIR/slurm.conf` on stdout
#   scripts/slurm-ci.sh stop DIR    cancel the cluster's jobs, stop the three daemons by their pid files
#
# Everything lives in DIR: its own munge socket and ports (found free), so it neither needs nor disturbs
# a munged or slurmctld that may already run on the machine. The configuration is the measured one of
# /work/shared/slurm-facts.md: proctrack/linuxproc and task/none (no systemd/cgroups needed), and
# cred_expire=10 so that a requeued job starts again ~10 s later (default 120 s).
# Exit codes of start: 0 running; 3 cannot install or start (the tests then skip, naming the reason).
set -euo pipefail

mode=${1:-}
S=${2:-}
if [[ -z "$mode" || -z "$S" ]]; then
    echo "usage: $0 start|stop DIR" >&2
    exit 2
fi
S=$(mkdir -p "$S" && cd "$S" && pwd)
say() { echo "slurm-ci: $*" >&2; }

stop_pid() {  # stop_pid FILE: SIGTERM the daemon named in FILE, SIGKILL after 15 s
    local f=$1 pid i
    [[ -s "$f" ]] || return 0
    pid=$(cat "$f")
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        for ((i = 0; i < 150; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$f"
}

if [[ "$mode" == stop ]]; then
    if [[ -f "$S/slurm.conf" && -s "$S/slurmctld.pid" ]]; then
        export SLURM_CONF="$S/slurm.conf"
        # jobs' slurmstepd processes outlive slurmd: cancel them first, and wait (bounded) until gone
        ids=$(timeout 10 squeue -h -o %A 2>/dev/null || true)
        if [[ -n "$ids" ]]; then
            timeout 10 scancel $ids 2>/dev/null || true
            for ((i = 0; i < 100; i++)); do
                [[ -z "$(timeout 5 squeue -h -o %A 2>/dev/null || true)" ]] && break
                sleep 0.2
            done
        fi
    fi
    stop_pid "$S/slurmd.pid"
    stop_pid "$S/slurmctld.pid"
    stop_pid "$S/munge/munged.pid"
    say "stopped (scratch $S)"
    exit 0
fi
[[ "$mode" == start ]] || { echo "usage: $0 start|stop DIR" >&2; exit 2; }

if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null || ! command -v munged >/dev/null \
        || ! command -v sbatch >/dev/null; then
    if [[ $(id -u) -ne 0 ]] || ! command -v apt-get >/dev/null; then
        say "slurmctld/munged absent and cannot install them (needs root and apt-get)"
        exit 3
    fi
    say "installing munge and slurm-wlm (apt-get)"
    if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge; } \
            >"$S/apt.log" 2>&1; then
        say "apt-get install slurm-wlm munge failed (see $S/apt.log)"
        exit 3
    fi
fi
if [[ $(id -u) -ne 0 ]]; then
    say "starting slurmd needs root"
    exit 3
fi

free_port() {  # the first port from $1 on that nothing listens on
    local p=$1
    while ss -Htln "sport = :$p" 2>/dev/null | grep -q . || ss -Htln "sport = :$((p + 1))" 2>/dev/null | grep -q .; do
        p=$((p + 2))
    done
    echo "$p"
}
base=$((20000 + (($$ * 2) % 20000)))
ctld_port=$(free_port "$base")
slurmd_port=$((ctld_port + 1))
host=$(hostname -s)
cpus=$(nproc)

chmod 0755 "$S"  # munged runs as munge and must reach its socket folder (mktemp -d makes 0700)
mkdir -p "$S/state" "$S/spool" "$S/log" "$S/munge"
chown munge:munge "$S/munge" && chmod 0755 "$S/munge"
[[ -f /etc/munge/munge.key ]] || { say "no /etc/munge/munge.key (munge package incomplete)"; exit 3; }

cat >"$S/slurm.conf" <<EOF
ClusterName=ci$ctld_port
SlurmctldHost=$host
SlurmctldPort=$ctld_port
SlurmdPort=$slurmd_port
AuthType=auth/munge
CredType=cred/munge
AuthInfo=cred_expire=10,socket=$S/munge/munge.socket
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$S/state
SlurmdSpoolDir=$S/spool
SlurmctldPidFile=$S/slurmctld.pid
SlurmdPidFile=$S/slurmd.pid
SlurmctldLogFile=$S/log/slurmctld.log
SlurmdLogFile=$S/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
MailProg=/bin/true
MinJobAge=600
NodeName=$host CPUs=$cpus State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
export SLURM_CONF="$S/slurm.conf"

runuser -u munge -- /usr/sbin/munged --socket="$S/munge/munge.socket" --pid-file="$S/munge/munged.pid" \
    --log-file="$S/munge/munged.log" --seed-file="$S/munge/munged.seed" \
    || { say "munged did not start (see $S/munge/munged.log)"; exit 3; }
# each daemon in its own session, output to the log folder; they write their pid files themselves
setsid slurmctld -D -c -f "$SLURM_CONF" </dev/null >>"$S/log/slurmctld.out" 2>&1 &
setsid slurmd -D -f "$SLURM_CONF" </dev/null >>"$S/log/slurmd.out" 2>&1 &

deadline=$((SECONDS + 60))
until [[ "$(timeout 5 sinfo -h -o %t 2>/dev/null || true)" == idle ]]; do
    if ((SECONDS > deadline)); then
        say "the node did not become idle within 60 s (logs in $S/log)"
        "$0" stop "$S" >&2 || true
        exit 3
    fi
    sleep 0.5
done
say "cluster up: slurmctld port $ctld_port, node $host ($cpus CPUs), scratch $S"
echo "export SLURM_CONF=$SLURM_CONF"
