#!/usr/bin/env bash
# Bring up a single-node Slurm (slurmctld, slurmd, munge, MariaDB, slurmdbd) in a temporary folder, as root, from
# Debian's packages (slurm-wlm, slurmdbd, munge, mariadb-server; --install installs them with apt-get). Nothing is
# written to /etc and no systemd or cgroups are needed. Prints the folder; `source FOLDER/env` points sbatch, sacct,
# squeue and submitit at this cluster, and `tools/slurm/down.sh FOLDER` stops exactly the daemons started here
# (their PIDs are in FOLDER/pids) and removes the folder.
#
#   tools/slurm/up.sh [--install] [FOLDER]      # FOLDER: default a new mktemp -d folder
#
# Ports: QKLIB_SLURM_PORT (default 16817) for slurmctld, +1 slurmd, +2 slurmdbd, +3 MariaDB on 127.0.0.1, so that
# a machine's own Slurm on 6817-6819 is left alone.
set -euo pipefail
install=0
if [ "${1:-}" = "--install" ]; then install=1; shift; fi
if [ "$(id -u)" != 0 ]; then echo "up.sh: run as root (the daemons run as root and munge)" >&2; exit 2; fi
packages="slurm-wlm slurmdbd munge mariadb-server"
if [ $install = 1 ]; then
  command -v slurmctld >/dev/null && command -v slurmdbd >/dev/null && command -v munged >/dev/null \
    && command -v mariadbd >/dev/null \
    || { export DEBIAN_FRONTEND=noninteractive; { apt-get update -q && apt-get install -y -q --no-install-recommends $packages; } >&2; }
fi
for tool in slurmctld slurmd slurmdbd munged mungekey mariadbd mariadb-install-db mariadb sacctmgr sinfo setpriv; do
  command -v $tool >/dev/null || { echo "up.sh: $tool not found: apt-get install $packages (or run up.sh --install)" >&2; exit 3; }
done
dir=${1:-$(mktemp -d /tmp/qklib-slurm.XXXXXX)}
mkdir -p "$dir"
dir=$(cd "$dir" && pwd)
if [ -e "$dir/pids" ]; then echo "up.sh: $dir/pids exists: a cluster runs there; tools/slurm/down.sh $dir first" >&2; exit 2; fi
chmod 755 "$dir"
trap 'echo "up.sh: line $LINENO failed: $BASH_COMMAND" >&2' ERR
if ! setpriv --reuid=munge --regid=munge --init-groups test -x "$dir"; then
  echo "up.sh: the munge user cannot reach $dir (a parent folder is not world-executable, e.g. mode 0700);" \
       "give a folder under /tmp" >&2
  exit 2
fi
port=${QKLIB_SLURM_PORT:-16817}
host=$(hostname -s)
start=$SECONDS
mkdir -p "$dir"/{state,spool,log,munge,mysql,run}
: > "$dir/pids"
record() { echo "$1 $2" >> "$dir/pids"; }  # name pid
fail() {
  echo "up.sh: $1; its log:" >&2; tail -n 20 "$2" "${2%.log}.out" >&2 || true
  "$(dirname "$0")/down.sh" "$dir" ${QKLIB_SLURM_KEEP:+--keep} >&2 || true
  exit 1
}
wait_for() {  # what, log, command...: poll every 0.2 s for up to 60 s while the last daemon started lives
  local what=$1 log=$2 pid; shift 2
  pid=$(tail -n 1 "$dir/pids" | awk '{print $2}')
  for _ in $(seq 300); do
    timeout 10 "$@" >/dev/null 2>&1 && return 0
    kill -0 "$pid" 2>/dev/null || fail "$what exited at start" "$log"
    sleep 0.2
  done
  fail "$what did not come up in 60 s" "$log"
}

# munge: its own key and socket, run as the munge user (munged refuses root-owned state).
chown munge:munge "$dir/munge"; chmod 755 "$dir/munge"  # clients need x on the socket's folder
setpriv --reuid=munge --regid=munge --init-groups mungekey --create --keyfile="$dir/munge/munge.key"
setsid setpriv --reuid=munge --regid=munge --init-groups munged --foreground --socket="$dir/munge/munge.socket" \
  --key-file="$dir/munge/munge.key" --pid-file="$dir/munge/munged.pid" --seed-file="$dir/munge/munge.seed" \
  --log-file="$dir/munge/munged.log" > "$dir/log/munged.out" 2>&1 < /dev/null &
record munged $!
wait_for munged "$dir/log/munged.out" test -S "$dir/munge/munge.socket"

# MariaDB for slurmdbd: a fresh data folder, TCP on 127.0.0.1 only.
mariadb-install-db --user=root --datadir="$dir/mysql" --auth-root-authentication-method=socket \
  --skip-test-db > "$dir/log/mariadb-install.log" 2>&1 || fail "mariadb-install-db failed" "$dir/log/mariadb-install.log"
setsid mariadbd --no-defaults --user=root --datadir="$dir/mysql" --socket="$dir/run/mysql.sock" --port=$((port + 3)) \
  --bind-address=127.0.0.1 --skip-name-resolve --pid-file="$dir/run/mysqld.pid" \
  --log-error="$dir/log/mariadb.log" --innodb-buffer-pool-size=64M > "$dir/log/mariadb.out" 2>&1 < /dev/null &
record mariadbd $!
wait_for MariaDB "$dir/log/mariadb.log" mariadb --no-defaults --socket="$dir/run/mysql.sock" -e "select 1"
password=$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
mariadb --no-defaults --socket="$dir/run/mysql.sock" -e "CREATE USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$password';
  GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"

cat > "$dir/slurmdbd.conf" <<CONF
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket
DbdHost=localhost
DbdPort=$((port + 2))
SlurmUser=root
PidFile=$dir/run/slurmdbd.pid
LogFile=$dir/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$((port + 3))
StorageUser=slurm
StoragePass=$password
StorageLoc=slurm_acct_db
CONF
chmod 600 "$dir/slurmdbd.conf"
# The node line is what this machine reports (slurmd -C), less UpTime.
node=$(slurmd -C | head -n 1)
node_name=$(echo "$node" | sed -n 's/^NodeName=\([^ ]*\).*/\1/p')
cat > "$dir/slurm.conf" <<CONF
ClusterName=qklib
SlurmctldHost=$host
SlurmctldPort=$port
SlurmdPort=$((port + 1))
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket=$dir/munge/munge.socket
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/run/slurmctld.pid
SlurmdPidFile=$dir/run/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$((port + 2))
# For slurmdbd connections the munge socket is named here, not by AuthInfo.
AccountingStoragePass=$dir/munge/munge.socket
MailProg=/bin/true
KillWait=5
MinJobAge=300
ReturnToService=2
SchedulerParameters=sched_interval=1
$node
PartitionName=debug Nodes=$node_name Default=YES MaxTime=INFINITE State=UP
CONF
cat > "$dir/env" <<CONF
export SLURM_CONF=$dir/slurm.conf  # slurmdbd reads slurmdbd.conf beside it
CONF
export SLURM_CONF=$dir/slurm.conf  # slurmdbd reads slurmdbd.conf beside it

setsid slurmdbd -D > "$dir/log/slurmdbd.out" 2>&1 < /dev/null &
record slurmdbd $!
wait_for slurmdbd "$dir/log/slurmdbd.log" sacctmgr -n list cluster
sacctmgr -i add cluster qklib > /dev/null
setsid slurmctld -D -i -f "$dir/slurm.conf" > "$dir/log/slurmctld.out" 2>&1 < /dev/null &
record slurmctld $!
wait_for slurmctld "$dir/log/slurmctld.log" scontrol ping
setsid slurmd -D -f "$dir/slurm.conf" > "$dir/log/slurmd.out" 2>&1 < /dev/null &
record slurmd $!
wait_for slurmd "$dir/log/slurmd.log" bash -c "sinfo -h -n '$node_name' -o %T | grep -qx idle"
wait_for "accounting (sacct)" "$dir/log/slurmdbd.log" sacct -n -X
echo "up.sh: single-node Slurm up in $((SECONDS - start)) s: source $dir/env; stop with tools/slurm/down.sh $dir" >&2
echo "$dir"
