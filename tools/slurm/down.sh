#!/usr/bin/env bash
# Stop the single-node Slurm that tools/slurm/up.sh started in FOLDER and remove FOLDER. Only the PIDs recorded in
# FOLDER/pids are signalled: SIGTERM to each, in the reverse order of their start, then SIGKILL to any still
# running 15 s later.
#   tools/slurm/down.sh FOLDER [--keep]     # --keep: leave the folder (logs) in place
set -uo pipefail
dir=${1:?usage: tools/slurm/down.sh FOLDER [--keep]}
if [ ! -f "$dir/pids" ]; then echo "down.sh: no $dir/pids: nothing started there by up.sh" >&2; exit 2; fi
alive() { kill -0 "$1" 2>/dev/null; }
pids=$(tac "$dir/pids" | awk '{print $2}')
for pid in $pids; do alive "$pid" && kill -TERM "$pid" 2>/dev/null; done
for _ in $(seq 75); do
  left=""
  for pid in $pids; do alive "$pid" && left="$left $pid"; done
  [ -z "$left" ] && break
  sleep 0.2
done
for pid in $left; do
  echo "down.sh: PID $pid ignored SIGTERM for 15 s: SIGKILL" >&2
  kill -KILL "$pid" 2>/dev/null
done
rm -f "$dir/pids"
if [ "${2:-}" != "--keep" ]; then rm -rf "$dir"; fi
