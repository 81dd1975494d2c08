#!/usr/bin/env bash
# MultiWorkerMirroredStrategy: one process per node, TF_CONFIG written from the worker list.
# Extra arguments go to python -m trainer.main; --workdir must be on storage all nodes share.
#
#   launch/multi_worker.sh node1:23456,node2:23456 0 --workdir=/shared/run ...   # on node1
#   launch/multi_worker.sh node1:23456,node2:23456 1 --workdir=/shared/run ...   # on node2
#   launch/multi_worker.sh local 2 [flags...]      # 2 workers on this machine (trying it out)
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ $# -lt 2 ]]; then
  echo "usage: launch/multi_worker.sh HOST:PORT,HOST:PORT,... INDEX [flags...]" >&2
  echo "       launch/multi_worker.sh local N [flags...]" >&2
  exit 2
fi
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
PYTHON=${VENV:-.venv}/bin/python
strategy="--gin_param=distribute.strategy='multi_worker'"

tf_config() {  # tf_config "h1:p1,h2:p2" INDEX
  "$PYTHON" -c 'import json, sys
print(json.dumps({"cluster": {"worker": sys.argv[1].split(",")},
                  "task": {"type": "worker", "index": int(sys.argv[2])}}))' "$1" "$2"
}

if [[ $1 == local ]]; then
  count=$2; shift 2
  base=${MULTI_WORKER_PORT:-23456}
  workers=$(seq -s, -f "localhost:%g" "$base" $((base + count - 1)))
  workdir=(--workdir="runs/multi_worker-$(date +%Y%m%d-%H%M%S)")
  for arg in "$@"; do [[ $arg == --workdir=* ]] && workdir=(); done
  declare -A running=()  # pid -> worker index
  for ((i = 0; i < count; i++)); do
    TF_CONFIG=$(tf_config "$workers" "$i") "$PYTHON" -m trainer.main "$strategy" "${workdir[@]}" "$@" &
    running[$!]=$i
  done
  # The first worker that fails ends the job: the others could wait on it for ever (one
  # stopped, or one still waiting in a collective). Their checkpoints are complete or
  # absent, never half-written, so they are killed at once, without adding lines of
  # their own after the failed worker's.
  status=0
  while ((${#running[@]})); do
    rc=0
    wait -n -p finished "${!running[@]}" || rc=$?
    index=${running[$finished]}
    unset "running[$finished]"
    if ((rc != 0)); then
      status=$rc
      if ((${#running[@]})); then
        kill -KILL "${!running[@]}" 2>/dev/null || true
        wait "${!running[@]}" 2>/dev/null || true
        echo "launch/multi_worker.sh: worker $index exited with status $rc; the job was stopped" >&2
      fi
      break
    fi
  done
  exit "$status"
fi
TF_CONFIG=$(tf_config "$1" "$2") exec "$PYTHON" -m trainer.main "$strategy" "${@:3}"
