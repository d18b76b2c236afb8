#!/usr/bin/env bash
# A real one-node SLURM cluster on this machine, to try (and test) cvt-train's SLURM path without a cluster:
#
#   scripts/slurm_local.sh up      # install (apt, as root), start munge, MariaDB, slurmdbd, slurmctld, slurmd
#   export SLURM_CONF=/tmp/cvt-slurm/slurm.conf   # what `up` prints: sbatch / sinfo / submitit read it
#   scripts/slurm_local.sh status  # sinfo
#   scripts/slurm_local.sh down    # cancel every job, stop the daemons
#
# No cgroups (proctrack/linuxproc, task/none), so it runs in a container or a VM as root. Accounting is real
# (slurmdbd on MariaDB, as clusters have it): submitit reads job states with `sacct`, and without it logs a warning
# per poll and never sees a cancelled job end. One node with this machine's CPUs and memory, one partition `debug`
# (time limit 60 min). Idempotent: `up` on a running cluster checks it and returns. The state (config, logs,
# spool, database) lives in $CVT_SLURM_DIR (/tmp/cvt-slurm).
set -euo pipefail

DIR="${CVT_SLURM_DIR:-/tmp/cvt-slurm}"
CONF="$DIR/slurm.conf"
export SLURM_CONF="$CONF"
NODE="$(hostname -s)"

fail() { echo "slurm_local: $*" >&2; exit 1; }

install_packages() {
  local missing=() pkg
  for pkg in munge slurmctld slurmd slurm-client slurmdbd mariadb-server; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
  done
  [[ ${#missing[@]} -eq 0 ]] && return
  [[ $(id -u) -eq 0 ]] || fail "needs root to install ${missing[*]} (apt-get); run it as root or install them"
  command -v apt-get >/dev/null || fail "no apt-get: install ${missing[*]} with this system's package manager"
  apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null 2>&1 \
    || fail "apt-get install ${missing[*]} failed"
}

write_config() {
  mkdir -p "$DIR/ctld" "$DIR/spool"
  local cpus mem
  cpus=$(nproc --all)
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 512 ))  # MiB, a little left to the system
  cat >"$CONF" <<EOF
# Written by scripts/slurm_local.sh: one node, no cgroups, no accounting.
ClusterName=cvtlocal
SlurmctldHost=$NODE
SlurmUser=root
AuthType=auth/munge
# a requeued job may start again after cred_expire seconds (SLURM's default, 120, is for real clusters)
AuthInfo=cred_expire=10
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=5,bf_interval=5  # start a requeued job within seconds of its BeginTime
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=$NODE
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
ReturnToService=2
MinJobAge=600
KillWait=30
DefMemPerCPU=$((mem / cpus))  # without it a job asks for the whole node's memory, and jobs run one at a time
NodeName=$NODE CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=60 State=UP
EOF
  cat >"$DIR/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=$NODE
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=cvtlocal
StorageLoc=slurm_acct_db
LogFile=$DIR/slurmdbd.log
PidFile=$DIR/slurmdbd.pid
EOF
  chmod 600 "$DIR/slurmdbd.conf"  # slurmdbd refuses a config others can read (it holds the password)
}

start_database() {  # MariaDB on its default socket (/run/mysqld), no network; slurmdbd on it
  local db="$DIR/mysql"
  if ! mariadb -e "select 1" >/dev/null 2>&1; then
    mkdir -p "$db" /run/mysqld && chown mysql:mysql "$db" /run/mysqld
    if [[ ! -d "$db/data/mysql" ]]; then
      mariadb-install-db --user=mysql --datadir="$db/data" --auth-root-authentication-method=socket \
        >"$db/install.log" 2>&1 || fail "mariadb-install-db failed; see $db/install.log"
    fi
    runuser -u mysql -- mariadbd --datadir="$db/data" --socket=/run/mysqld/mysqld.sock --skip-networking \
      --pid-file="$db/pid" --log-error="$db/err" >/dev/null 2>&1 &
    for _ in $(seq 100); do mariadb -e "select 1" >/dev/null 2>&1 && break; sleep 0.2; done
    mariadb -e "select 1" >/dev/null 2>&1 || fail "MariaDB did not start; see $db/err"
  fi
  # a fresh cluster numbers its jobs from 1 again: records of an earlier one would answer sacct for them
  mariadb -e "DROP DATABASE IF EXISTS slurm_acct_db; CREATE DATABASE slurm_acct_db; CREATE USER IF NOT EXISTS 'slurm'@'localhost'
    IDENTIFIED BY 'cvtlocal'; GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';" || fail "cannot set up the database"
  /usr/sbin/slurmdbd || fail "slurmdbd did not start; see $DIR/slurmdbd.log"  # reads slurmdbd.conf beside SLURM_CONF
  for _ in $(seq 100); do sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 0.2; done
  sacctmgr -i -Q add cluster cvtlocal >/dev/null 2>&1 || true  # (already there after a restart)
  sacctmgr -n list cluster format=cluster 2>/dev/null | grep -q cvtlocal \
    || fail "slurmdbd is not answering; see $DIR/slurmdbd.log"
}

running() { [[ -f "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

start_munge() {
  if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then return; fi
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge 2>/dev/null || true
  [[ -s /etc/munge/munge.key ]] || { mungekey --create --force >/dev/null 2>&1 || fail "cannot create /etc/munge/munge.key"; }
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  runuser -u munge -- /usr/sbin/munged || fail "munged did not start; see /var/log/munge/munged.log"
  for _ in $(seq 50); do munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && return; sleep 0.1; done
  fail "munged started but credentials do not verify; see /var/log/munge/munged.log"
}

node_state() { sinfo -h -n "$NODE" -o %T 2>/dev/null | head -1 | tr -d '*~#'; }

up() {
  install_packages
  if running "$DIR/slurmctld.pid" && running "$DIR/slurmd.pid" && running "$DIR/slurmdbd.pid" && [[ "$(node_state)" =~ ^(idle|mixed|allocated)$ ]]; then
    echo "slurm_local: up (node $NODE $(node_state)); export SLURM_CONF=$CONF"
    return
  fi
  down quiet
  write_config
  start_munge
  start_database
  /usr/sbin/slurmctld -f "$CONF" -i || fail "slurmctld did not start; see $DIR/slurmctld.log"
  /usr/sbin/slurmd -f "$CONF" || fail "slurmd did not start; see $DIR/slurmd.log"
  for _ in $(seq 150); do
    [[ "$(node_state)" == idle ]] && { echo "slurm_local: up (node $NODE idle); export SLURM_CONF=$CONF"; return; }
    sleep 0.2
  done
  fail "node $NODE is '$(node_state)', not idle, after 30 s; see $DIR/slurmctld.log and $DIR/slurmd.log"
}

down() {
  if [[ -f "$CONF" ]] && running "$DIR/slurmctld.pid"; then scancel --full --quiet --user=root 2>/dev/null || true; fi
  for pid in "$DIR/slurmd.pid" "$DIR/slurmctld.pid" "$DIR/slurmdbd.pid" "$DIR/mysql/pid"; do
    if running "$pid"; then
      kill "$(cat "$pid")" 2>/dev/null || true
      for _ in $(seq 50); do running "$pid" || break; sleep 0.1; done
    fi
    rm -f "$pid"
  done
  rm -rf "$DIR/ctld" "$DIR/spool"  # no job survives a restart of the cluster
  [[ "${1:-}" == quiet ]] || echo "slurm_local: down"
}

case "${1:-}" in
  up) up ;;
  down) down ;;
  status) sinfo ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
