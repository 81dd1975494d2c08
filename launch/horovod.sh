#!/usr/bin/env bash
# Horovod (Gloo) workers running python -m trainer.main; extra arguments go to it.
#
#   launch/horovod.sh 8 --gin_file=cub200 ...            8 workers on this machine
#   launch/horovod.sh hosts.txt --gin_file=cub200 ...    workers on the hosts listed in a
#                                                        hosts file, "host slots=N" per line
#                                                        (passwordless ssh between them)
#   launch/horovod.sh 8 doctor                           python -m trainer.doctor on 8 workers
#   launch/horovod.sh --elastic 4 16 discover.sh ...     elastic: 4 to 16 workers on the hosts
#                                                        that the executable discover.sh
#                                                        prints, "host:slots" per line; it is
#                                                        run again every second, and workers
#                                                        that die or leave are dropped
# One worker per GPU; on a CPU-only machine the workers share the cores. HOROVODRUN_ARGS
# adds flags of horovodrun's own, e.g. "--blacklist-cooldown-range 60 300".
set -euo pipefail
cd "$(dirname "$0")/.."
usage="usage: launch/horovod.sh N|HOSTFILE|--elastic MIN MAX DISCOVER [trainer.main flags...]"
if [[ $# -lt 1 ]]; then
  echo "$usage" >&2
  exit 2
fi
target=$1; shift
# Every worker must name the same default workdir.
export METRIC_TRAINER_RUN_ID=${METRIC_TRAINER_RUN_ID:-$(date +%Y%m%d-%H%M%S)}
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
VENV=${VENV:-.venv}
if [[ $target =~ ^[0-9]+$ ]]; then
  workers=$target
  hosts=(-np "$target" -H "localhost:$target")
elif [[ $target == --elastic ]]; then
  if [[ $# -lt 3 || ! $1 =~ ^[1-9][0-9]*$ || ! $2 =~ ^[1-9][0-9]*$ || $1 -gt $2 ]]; then
    echo "$usage (1 <= MIN <= MAX)" >&2
    exit 2
  fi
  if [[ ! -x $3 ]]; then
    echo "launch/horovod.sh: host discovery script $3 is not an executable file" >&2
    exit 2
  fi
  workers=$2
  hosts=(-np "$1" --min-np "$1" --max-np "$2" --host-discovery-script "$(realpath "$3")")
  shift 3
elif [[ -f $target ]]; then
  workers=$(awk '{n = 1; for (i = 2; i <= NF; i++) if ($i ~ /^slots=/) n = substr($i, 7); s += n} END {print s}' "$target")
  hosts=(-np "$workers" --hostfile "$target")
else
  echo "launch/horovod.sh: $target is neither a worker count nor a hosts file" >&2
  exit 2
fi
if [[ -z ${CUDA_VISIBLE_DEVICES+x} ]] && ! command -v nvidia-smi >/dev/null 2>&1; then
  # CPU only: give each worker its share of the cores instead of all of them each.
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( ( $(nproc) + workers - 1 ) / workers ))}
fi
# Only the chief prints progress; drop horovodrun's "[0]<stdout>:" prefixes (in an elastic
# job the chief can be a worker that started with another rank). Every worker that fails
# says why in one line "error: rank R on host H: ..."; the first one is shown and the
# others' are dropped (the same mistake on 8 workers is one message). horovodrun then
# raises a traceback of its own: replace it by one line, and exit with the failed
# worker's status (2 for a configuration mistake).
strip='s/^\[[0-9]\+\]<std\(out\|err\)>://'
status_file=$(mktemp)
trap 'rm -f "$status_file"' EXIT
# TensorFlow's start-up notices come before its log level applies (TF_CPP_MIN_LOG_LEVEL
# cannot silence them), several per process: dropped, those exact ones only. A worker
# whose host left an elastic job aborts inside Horovod (its faulthandler then dumps every
# thread): said in one line instead.
summarize='
  /^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR$/ { next }
  /^I0000 [0-9:. ]+ (port|cpu_feature_guard)\.cc:[0-9]+\] / { next }
  /^To enable the following instructions: .* with the appropriate compiler flags\.$/ { next }
  /^E0000 [0-9:. ]+ util\.cc:[0-9]+\] oneDNN supports DT_INT32 only on platforms with AVX-512/ { next }
  /^error: rank [0-9]+ on host / { if (errored) next; errored = 1; print; fflush(); next }
  /^terminate called after throwing an instance of .std::runtime_error.$/ { pending = $0; next }
  pending != "" && / has been removed from elastic job$/ {
    sub(/^ *what\(\): +/, ""); sub(/ has been removed from elastic job$/, "")
    print "horovodrun: worker " $0 " left the job (its host was removed)"; fflush()
    pending = ""; removed = 1; next }
  pending != "" { print pending; pending = "" }
  removed && /^(Fatal Python error: Aborted|Thread 0x.*|Current thread 0x.*|  File .*|)$/ { next }
  removed && /^(Extension modules: .*|Aborted.*)$/ { next }
  /^Traceback \(most recent call last\):$/ { held = 1; next }
  held && /^RuntimeError: Horovod detected/ { next }
  held && /^Process name: / { worker = $3; next }
  held && /^Exit code: / {
    print "horovodrun: worker " worker " exited with status " $3 "; the job was stopped"
    print $3 > status; held = 0; next }
  held { next }
  { print; fflush() }'
# SIGTERM or SIGINT (a scheduler pre-empting the job, Ctrl-C) goes straight to this
# machine's workers, which agree with the others to stop at the next step and write a
# checkpoint. horovodrun runs in a session of its own: signalled itself, it would give
# the workers 5 seconds and then kill them. The output filters ignore the signal.
descendants() {
  local p
  for p in $(pgrep -P "$1"); do echo "$p"; descendants "$p"; done
}
stop_workers() {  # the python workers, not the shells horovodrun starts them with
  local p args
  for p in $(descendants "$child"); do
    mapfile -d '' args < "/proc/$p/cmdline" 2>/dev/null || continue
    if [[ ${args[1]-} == -m && ${args[2]-} == trainer.main ]]; then
      kill -TERM "$p" 2>/dev/null
    fi
  done
}
module=trainer.main
if [[ ${1:-} == doctor ]]; then module=trainer.doctor; shift; fi
set +e
read -ra extra <<< "${HOROVODRUN_ARGS-}"
setsid "$VENV/bin/horovodrun" --gloo "${hosts[@]}" "${extra[@]}" "$VENV/bin/python" -m "$module" "$@" \
  > >(trap '' TERM INT; exec sed -u "$strip") \
  2> >(trap '' TERM INT; sed -u "$strip" | awk -v status="$status_file" "$summarize" >&2) &
child=$!
trap stop_workers TERM INT
wait "$child"
rc=$?
if [[ $rc -gt 128 ]] && kill -0 "$child" 2>/dev/null; then  # wait was interrupted
  wait "$child"
  rc=$?
fi
set -e
if [[ $rc -ne 0 ]]; then
  for _ in $(seq 50); do [[ -s $status_file ]] && break; sleep 0.1; done  # filters finish
fi
if [[ $rc -ne 0 && -s $status_file ]]; then
  rc=$(cat "$status_file")
  (( rc > 0 && rc < 256 )) || rc=1
fi
exit "$rc"
