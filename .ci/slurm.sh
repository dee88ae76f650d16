#!/usr/bin/env bash
# Single-node SLURM (munged + slurmctld + slurmd, Debian 12's slurm-wlm 22.05) for the `slurm` test
# tier. Everything the cluster writes lives under one state directory; daemons run without systemd,
# write pid files there and are stopped by those PIDs only. Every subcommand is idempotent.
#
# Usage: slurm.sh start|stop|status|env            (as root; state in $SLURM_DIR, default /tmp/slurm-ci)
#   start   install slurm-wlm + munge if missing, write DIR/etc/slurm.conf, start what is not running,
#           wait until the node is idle (about 7 s from a clean machine, 1-2 s with packages present)
#   stop    SIGTERM slurmd, slurmctld and (only if this script started it) munged; SIGKILL after 20 s
#   status  exit 0 when both slurm daemons run and the node answers sinfo
#   env     print the `export SLURM_CONF=...` line that client commands (sinfo, sbatch) need
# Env at start: SLURM_CPUS (default nproc; may exceed it), SLURM_MEM_MB (default 80 % of RAM).
set -euo pipefail

CMD=${1:?usage: $0 start|stop|status|env}
D=$(realpath -m "${SLURM_DIR:-/tmp/slurm-ci}")
CONF=$D/etc/slurm.conf
export SLURM_CONF=$CONF

log() { echo "slurm.sh: $*" >&2; }

waitfor() {  # waitfor TENTHS COMMAND...: poll every 0.2 s
  local n=$1; shift
  for _ in $(seq "$n"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  return 1
}

pid_of() {  # pid_of NAME PIDFILE: the live pid, or fail (a stale file may name an unrelated process)
  local p
  [ -s "$2" ] || return 1
  p=$(cat "$2")
  kill -0 "$p" 2>/dev/null && [ "$(cat "/proc/$p/comm" 2>/dev/null)" = "$1" ] || return 1
  echo "$p"
}

install_packages() {
  local b
  for b in slurmctld slurmd sbatch munged; do
    command -v "$b" >/dev/null || PATH=$PATH:/usr/sbin command -v "$b" >/dev/null || {
      # NOTE: with policy-rc.d or without systemd the postinst scripts start no daemon; we do below.
      DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends slurm-wlm munge \
        || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends slurm-wlm munge; }
      return
    }
  done
}

write_conf() {
  local cpus=${SLURM_CPUS:-$(nproc)}
  local mem=${SLURM_MEM_MB:-$(awk '/MemTotal/{print int($2/1024*0.8)}' /proc/meminfo)}
  mkdir -p "$D"/{etc,state,spool,log,run}
  cat > "$CONF.new" <<CONF
# Single-node SLURM for CI, written by .ci/slurm.sh. No cgroup plugins: linuxproc tracks a job's
# processes by parent pid, so nothing depends on the host's cgroup setup.
ClusterName=ci
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# a requeued job may start again only after cred_expire seconds (default 120; 5 is the minimum)
AuthInfo=cred_expire=10
MpiDefault=none
SwitchType=switch/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
# finished-job log, so that 'sacct -c' works without slurmdbd
JobCompType=jobcomp/filetxt
JobCompLoc=$D/log/jobcomp.txt
# pick up pending (e.g. requeued) jobs within ~5 s instead of 30-60 s
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5,bf_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
# lets CPUs= exceed the hardware (two 2-CPU jobs side by side on a 2-core runner)
SlurmdParameters=config_overrides
ReturnToService=2
# finished jobs stay visible to 'scontrol show job' for an hour
MinJobAge=3600
KillWait=30
MailProg=/bin/true
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool
SlurmctldPidFile=$D/run/slurmctld.pid
SlurmdPidFile=$D/run/slurmd.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
CONF
  mv "$CONF.new" "$CONF"
}

start_munge() {
  (munge -n | unmunge) >/dev/null 2>&1 && return 0   # a munged already runs (ours or the system's)
  [ -s /etc/munge/munge.key ] || dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  install -d -o munge -g munge -m 0755 /run/munge
  runuser -u munge -- /usr/sbin/munged           # forks; writes /run/munge/munged.pid
  touch "$D/run/munged.ours"                     # so that `stop` leaves a system munged alone
  waitfor 50 sh -c 'munge -n | unmunge' || { log "munged did not start"; return 1; }
}

node_ready() { sinfo -h -n localhost -o %t | grep -qE '^(idle|alloc|mix|comp)'; }

start() {
  install_packages
  write_conf
  start_munge
  # -c: discard saved job/node state, else sinfo may show the node idle before slurmd registered
  pid_of slurmctld "$D/run/slurmctld.pid" >/dev/null || /usr/sbin/slurmctld -c -f "$CONF"
  pid_of slurmd "$D/run/slurmd.pid" >/dev/null || /usr/sbin/slurmd -f "$CONF" -N localhost
  if waitfor 150 node_ready; then sinfo; return 0; fi
  log "the node did not become idle; last log lines:"
  tail -n 30 "$D"/log/*.log >&2 || true
  return 1
}

stop_one() {  # stop_one NAME PIDFILE
  local pid
  pid=$(pid_of "$1" "$2") || return 0
  kill "$pid"
  for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.2; done
  log "$1 ($pid) ignored SIGTERM for 20 s; sending SIGKILL"
  kill -9 "$pid" 2>/dev/null || true
}

stop() {
  stop_one slurmd "$D/run/slurmd.pid"
  stop_one slurmctld "$D/run/slurmctld.pid"
  if [ -e "$D/run/munged.ours" ]; then
    stop_one munged /run/munge/munged.pid
    rm -f "$D/run/munged.ours"
  fi
}

status() {
  pid_of slurmctld "$D/run/slurmctld.pid" >/dev/null && pid_of slurmd "$D/run/slurmd.pid" >/dev/null \
    && node_ready && sinfo
}

case $CMD in
  start) start ;;
  stop) stop ;;
  status) status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) log "unknown command $CMD (start|stop|status|env)"; exit 2 ;;
esac
