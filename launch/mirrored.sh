#!/usr/bin/env bash
# MirroredStrategy: one process, one replica per visible GPU; extra arguments go to
# python -m trainer.main.
#
#   launch/mirrored.sh --gin_file=cub200 ...
#   launch/mirrored.sh --gin_param=distribute.cpu_replicas=4   # no GPU: 4 logical CPUs
#   launch/mirrored.sh doctor [--gin_param=distribute.cpu_replicas=2]   # python -m trainer.doctor
set -euo pipefail
cd "$(dirname "$0")/.."
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
module=trainer.main
if [[ ${1:-} == doctor ]]; then module=trainer.doctor; shift; fi
exec "${VENV:-.venv}/bin/python" -m "$module" --gin_param="distribute.strategy='mirrored'" "$@"
