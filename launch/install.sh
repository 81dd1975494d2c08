#!/usr/bin/env bash
# Installs everything the project needs into .venv at the repo root:
# TensorFlow (CPU build unless TF_PACKAGE says otherwise), the Python tools, and
# Horovod 0.28.1 built from its source release with TensorFlow + Gloo.
# A second run is a no-op (stamp file); the Horovod wheel is cached, keyed by
# Horovod, TensorFlow and Python versions, so a rebuilt venv installs in seconds.
#
# Environment:
#   TF_PACKAGE           pip spec for TensorFlow (default tensorflow-cpu==2.21.*;
#                        GPU machines: 'tensorflow[and-cuda]==2.21.*')
#   HOROVOD_WHEEL_CACHE  where built Horovod wheels are kept
#                        (default ${XDG_CACHE_HOME:-~/.cache}/metric-trainer/wheels)
#   PYTHON               interpreter for the venv (default python3.11, else python3)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
TF_PACKAGE="${TF_PACKAGE:-tensorflow-cpu==2.21.*}"
HOROVOD_VERSION="0.28.1"
CACHE="${HOROVOD_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/metric-trainer/wheels}"
PY_PACKAGES=(
  "$TF_PACKAGE" "tensorboard" "absl-py>=1.0" "gin-config>=0.5" "scikit-learn>=1.3"
  "numpy" "pillow" "pytest>=7" "pytest-xdist>=3" "ruff"
  # Horovod's runtime dependencies, installed here because its wheel is installed --no-deps.
  "cloudpickle" "psutil" "pyyaml" "packaging"
)

log() { printf '[install] %s\n' "$*" >&2; }

# The stamp changes whenever this script does, so editing the package list reinstalls.
STAMP="$VENV/.installed-$(sha1sum "${BASH_SOURCE[0]}" | cut -c1-12)"
if [[ -f "$STAMP" ]]; then
  exit 0
fi

need_system_packages() {
  local missing=()
  command -v cmake >/dev/null 2>&1 || missing+=(cmake)
  command -v g++ >/dev/null 2>&1 || missing+=(g++)
  command -v make >/dev/null 2>&1 || missing+=(make)
  if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
      log "missing system packages: ${missing[*]} (install them, e.g. 'sudo apt-get install ${missing[*]}')"
      exit 1
    fi
    log "installing system packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

pick_python() {
  if [[ -n "${PYTHON:-}" ]]; then echo "$PYTHON"; return; fi
  if command -v python3.11 >/dev/null 2>&1; then echo python3.11; else echo python3; fi
}

if [[ ! -x "$VENV/bin/python" ]]; then
  PY="$(pick_python)"
  log "creating $VENV with $($PY --version 2>&1)"
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip wheel "setuptools<81"
log "installing Python packages (${TF_PACKAGE}, tensorboard, absl-py, gin-config, ...)"
"${PIP[@]}" install -q "${PY_PACKAGES[@]}"

TF_VERSION="$("$VENV/bin/python" -c 'import tensorflow as tf; print(tf.__version__)' 2>/dev/null)"
PY_TAG="$("$VENV/bin/python" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
KEY="horovod-${HOROVOD_VERSION}-tf${TF_VERSION}-${PY_TAG}"
mkdir -p "$CACHE/$KEY"
WHEEL="$(ls "$CACHE/$KEY"/horovod-*.whl 2>/dev/null | head -n1 || true)"

if [[ -z "$WHEEL" ]]; then
  need_system_packages
  BUILD="$(mktemp -d)"
  trap 'rm -rf "$BUILD"' EXIT
  log "building Horovod ${HOROVOD_VERSION} for TensorFlow ${TF_VERSION} (${PY_TAG}); takes ~10 min once, then cached in $CACHE/$KEY"
  "${PIP[@]}" download -q --no-deps --no-binary :all: "horovod==${HOROVOD_VERSION}" -d "$BUILD"
  tar -xzf "$BUILD/horovod-${HOROVOD_VERSION}.tar.gz" -C "$BUILD"
  SRC="$BUILD/horovod-${HOROVOD_VERSION}"
  # xla_mpi_ops.cc does not compile against TensorFlow >= 2.16 (XLA headers moved);
  # the project does not use Horovod's XLA ops, so leave it out of the build.
  sed -i '/xla_mpi_ops\.cc/d' "$SRC/horovod/tensorflow/CMakeLists.txt"
  grep -q xla_mpi_ops "$SRC/horovod/tensorflow/CMakeLists.txt" && { log "could not patch out xla_mpi_ops.cc"; exit 1; }
  (
    cd "$SRC"
    export HOROVOD_WITH_TENSORFLOW=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1
    export HOROVOD_WITHOUT_PYTORCH=1 HOROVOD_WITHOUT_MXNET=1
    export HOROVOD_GPU_OPERATIONS="${HOROVOD_GPU_OPERATIONS:-}"
    export MAKEFLAGS="-j$(nproc)"
    "${PIP[@]}" wheel --no-deps --no-build-isolation -w "$BUILD/dist" . > "$BUILD/build.log" 2>&1 \
      || { tail -n 60 "$BUILD/build.log" >&2; log "Horovod build failed (full log above, last 60 lines)"; exit 1; }
  )
  # Copy then rename so that a killed install never leaves a half-written wheel in the cache.
  built="$(ls "$BUILD"/dist/horovod-*.whl | head -n1)"
  cp "$built" "$CACHE/$KEY/.partial.whl"
  mv "$CACHE/$KEY/.partial.whl" "$CACHE/$KEY/$(basename "$built")"
  WHEEL="$CACHE/$KEY/$(basename "$built")"
else
  log "using cached Horovod wheel $WHEEL"
fi
"${PIP[@]}" install -q --no-deps --force-reinstall "$WHEEL"

log "checking the Horovod build"
"$VENV/bin/horovodrun" --check-build | sed 's/^/[install]   /' >&2
rm -f "$VENV"/.installed-*
touch "$STAMP"
log "done: $VENV"
