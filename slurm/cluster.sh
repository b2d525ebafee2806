#!/usr/bin/env bash
# A real SLURM cluster on this one machine: munge, slurmctld and two slurmd "nodes" (n1, n2) that
# share the host, each with its own port and spool (Debian's slurm-wlm supports multiple slurmd).
#
#   sudo slurm/cluster.sh start [STATE_DIR]   # prints the SLURM_CONF to export
#   sudo slurm/cluster.sh stop  [STATE_DIR]
#
# Needs root and `apt-get install slurm-wlm munge` (slurm/cluster.sh install does that).
# CPUS_PER_NODE (default: half of this machine's cores, at least 1) sets each node's size.
set -euo pipefail
action=${1:-start}
state=${2:-${FER_DIST_SLURM_STATE:-/tmp/fer-dist-slurm}}
conf=$state/slurm.conf

if [[ $action == install ]]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge
  exit 0
fi

if [[ $action == stop ]]; then
  for pidfile in "$state"/slurmd-*.pid "$state"/slurmctld.pid; do
    [[ -f $pidfile ]] && kill "$(cat "$pidfile")" 2>/dev/null || true
  done
  exit 0
fi

for tool in slurmctld slurmd munged mungekey sinfo; do
  command -v "$tool" >/dev/null || { echo "error: $tool not found; run: sudo $0 install" >&2; exit 2; }
done
[[ $(id -u) == 0 ]] || { echo "error: starting slurmd needs root" >&2; exit 2; }

# munge: one key, one daemon
[[ -f /etc/munge/munge.key ]] || mungekey --create --keyfile=/etc/munge/munge.key
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
mkdir -p /run/munge && chown munge:munge /run/munge
if ! munge -n >/dev/null 2>&1; then
  runuser -u munge -- munged
fi

cores=$(nproc)
cpus=${CPUS_PER_NODE:-$(( cores / 2 > 0 ? cores / 2 : 1 ))}
host=$(hostname -s)
mkdir -p "$state/ctld"
cat > "$conf" <<CONF
ClusterName=ferdist
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=${SLURMCTLD_PORT:-16817}
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$state/ctld
SlurmctldPidFile=$state/slurmctld.pid
SlurmctldLogFile=$state/slurmctld.log
SlurmdSpoolDir=$state/slurmd-%n
SlurmdPidFile=$state/slurmd-%n.pid
SlurmdLogFile=$state/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
ReturnToService=2
KillWait=30
MinJobAge=600
NodeName=n1 NodeHostname=$host NodeAddr=127.0.0.1 Port=16818 CPUs=$cpus RealMemory=1000 State=UNKNOWN
NodeName=n2 NodeHostname=$host NodeAddr=127.0.0.1 Port=16819 CPUs=$cpus RealMemory=1000 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=INFINITE State=UP
CONF
"$0" stop "$state"
sleep 1
slurmctld -f "$conf" -i
slurmd -f "$conf" -N n1
slurmd -f "$conf" -N n2
export SLURM_CONF=$conf
for _ in $(seq 60); do
  if [[ $(sinfo -h -o %t | sort -u | tr '\n' ' ') == "idle " ]]; then
    echo "export SLURM_CONF=$conf"
    exit 0
  fi
  sleep 1
done
echo "error: the nodes did not come up; see $state/*.log" >&2
sinfo >&2
exit 1
