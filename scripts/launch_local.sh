#!/usr/bin/env bash
# Several training processes on this machine joined by jax.distributed: the multi-host path
# without a cluster (tests/test_multihost.py runs it). Each process gets its own emulated CPU
# devices, or with -g its own GPUs.
#
#   scripts/launch_local.sh [-n 2] [-d 4] [-p PORT] [-l LOGDIR] [-g] -- \
#       python -m train --config experiments/tiny_dense.py --workdir /tmp/meshlm_2proc
#
#   -n  processes (default 2)
#   -d  devices per process (default 4): CPU devices via --xla_force_host_platform_device_count,
#       or with -g GPUs via CUDA_VISIBLE_DEVICES (process i gets GPUs i*d .. i*d+d-1)
#   -p  coordinator port on localhost (default: a free one)
#   -l  directory for process_<i>.log (default: a new directory under /tmp); process 0's
#       output is also shown here
#   -g  use GPUs instead of emulated CPU devices
#
# Every process gets --config.distributed.{enabled,coordinator_address,num_processes,
# process_id}. If one process fails the others are stopped; the exit status is the first
# failure's. Set DRY_RUN=1 to print the commands instead of running them.
set -euo pipefail

procs=2 devices=4 port='' logdir='' gpu=0
while getopts 'n:d:p:l:g' opt; do
  case "$opt" in
    n) procs=$OPTARG ;;
    d) devices=$OPTARG ;;
    p) port=$OPTARG ;;
    l) logdir=$OPTARG ;;
    g) gpu=1 ;;
    *) sed -n '2,22p' "$0" >&2; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[[ "${1:-}" == '--' ]] && shift
if [[ $# -eq 0 ]]; then
  echo 'scripts/launch_local.sh: give the command after --, e.g. -- python -m train ...' >&2
  exit 2
fi
python_bin=${PYTHON:-python}
if [[ -z "$port" ]]; then
  port=$("$python_bin" -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')
fi
logdir=${logdir:-$(mktemp -d /tmp/meshlm_local.XXXXXX)}
mkdir -p "$logdir"
repo=$(cd "$(dirname "$0")/.." && pwd)

pids=()
stop_all() {
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
}
trap 'stop_all; exit 130' INT TERM

for ((i = 0; i < procs; i++)); do
  flags=(--config.distributed.enabled=True
         "--config.distributed.coordinator_address=localhost:$port"
         "--config.distributed.num_processes=$procs"
         "--config.distributed.process_id=$i")
  if [[ $gpu == 1 ]]; then
    first=$((i * devices))
    visible=$(seq -s, "$first" $((first + devices - 1)))
    env_vars=("CUDA_VISIBLE_DEVICES=$visible")
  else
    env_vars=(JAX_PLATFORMS=cpu "XLA_FLAGS=--xla_force_host_platform_device_count=$devices")
  fi
  env_vars+=("PYTHONPATH=$repo${PYTHONPATH:+:$PYTHONPATH}")
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    echo "env ${env_vars[*]} $* ${flags[*]} > $logdir/process_$i.log"
    continue
  fi
  if [[ $i == 0 ]]; then  # exec: the pid is the training process's own; tee shows its output.
    (cd "$repo" && exec env "${env_vars[@]}" "$@" "${flags[@]}" > >(tee "$logdir/process_$i.log") 2>&1) &
  else
    (cd "$repo" && exec env "${env_vars[@]}" "$@" "${flags[@]}" > "$logdir/process_$i.log" 2>&1) &
  fi
  pids+=($!)
done
[[ "${DRY_RUN:-0}" == 1 ]] && exit 0

status=0
remaining=${#pids[@]}
while ((remaining > 0)); do
  set +e
  wait -n -p done_pid "${pids[@]}"
  rc=$?
  set -e
  remaining=$((remaining - 1))
  if [[ $rc != 0 && $status == 0 ]]; then
    status=$rc
    echo "scripts/launch_local.sh: a process (pid $done_pid) exited with $rc; stopping the others;" \
         "logs in $logdir" >&2
    stop_all
  fi
done
echo "scripts/launch_local.sh: $procs processes done (status $status); logs in $logdir" >&2
exit "$status"
