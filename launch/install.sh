#!/usr/bin/env bash
# Installs everything the project needs into .venv at the repo root, the project itself
# included (editable):
# TensorFlow (the CUDA build where nvidia-smi lists GPUs, else the CPU build), faiss for
# approximate search (its GPU build likewise), the Python tools, and Horovod 0.28.1 built from its source release with TensorFlow + Gloo (+ NCCL
# on GPU machines that have it). A second run with the same settings does nothing (stamp
# file keyed by this script, the TensorFlow package, Horovod's GPU operations and the
# Python version); the Horovod wheel is cached under the same kind of key, so a rebuilt
# venv installs in seconds.
#
#   launch/install.sh          install (what `make install` runs)
#   launch/install.sh --plan   print the decisions for this machine; install nothing
#
# Environment:
#   TF_PACKAGE              pip spec for TensorFlow (default: 'tensorflow[and-cuda]==2.21.*'
#                           where nvidia-smi lists GPUs, else 'tensorflow-cpu==2.21.*')
#   FAISS_PACKAGE           pip spec for faiss (default: 'faiss-gpu-cu12==1.14.1.post1' where
#                           nvidia-smi lists GPUs, else 'faiss-cpu==1.15.1')
#   HOROVOD_GPU_OPERATIONS  Horovod's GPU collectives: NCCL by default where there are GPUs,
#                           NCCL and the CUDA toolkit are found; '' for none (host memory)
#   HOROVOD_NCCL_HOME       where NCCL is (include/nccl.h, lib/libnccl.so*), if not in /usr
#   HOROVOD_WHEEL_CACHE     where built Horovod wheels are kept
#                           (default ${XDG_CACHE_HOME:-~/.cache}/metric-trainer/wheels)
#   PYTHON                  interpreter for the venv (default python3.11, else python3)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
HOROVOD_VERSION="0.28.1"
TF_VERSION_SPEC="2.21.*"
CACHE="${HOROVOD_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/metric-trainer/wheels}"
PLAN=0
case "${1:-}" in
  "") ;;
  --plan) PLAN=1 ;;
  *) echo "usage: launch/install.sh [--plan]" >&2; exit 2 ;;
esac

log() { printf '[install] %s\n' "$*" >&2; }

pick_python() {
  if [[ -x "$VENV/bin/python" ]]; then echo "$VENV/bin/python"; return; fi
  if [[ -n "${PYTHON:-}" ]]; then echo "$PYTHON"; return; fi
  if command -v python3.11 >/dev/null 2>&1; then echo python3.11; else echo python3; fi
}

# --- decisions (all of them before anything is installed; --plan prints them) ---------
GPU_COUNT=0
if command -v nvidia-smi >/dev/null 2>&1; then
  GPU_COUNT=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
fi
if [[ $GPU_COUNT -gt 0 ]]; then
  MACHINE="$GPU_COUNT GPU(s) listed by nvidia-smi"
  DEFAULT_TF="tensorflow[and-cuda]==$TF_VERSION_SPEC"
else
  MACHINE="no GPU ($(command -v nvidia-smi >/dev/null 2>&1 && echo 'nvidia-smi lists none' || echo 'no nvidia-smi'))"
  DEFAULT_TF="tensorflow-cpu==$TF_VERSION_SPEC"
fi
TF_PACKAGE="${TF_PACKAGE:-$DEFAULT_TF}"
if [[ $GPU_COUNT -gt 0 ]]; then DEFAULT_FAISS="faiss-gpu-cu12==1.14.1.post1"; else DEFAULT_FAISS="faiss-cpu==1.15.1"; fi
FAISS_PACKAGE="${FAISS_PACKAGE:-$DEFAULT_FAISS}"
if [[ $TF_PACKAGE == "$DEFAULT_TF" ]]; then TF_WHY="default for this machine"; else TF_WHY="from TF_PACKAGE"; fi
case "$TF_PACKAGE" in
  tensorflow-cpu*) OTHER_TF=tensorflow ;;   # the two builds share the tensorflow/ folder:
  *) OTHER_TF=tensorflow-cpu ;;             # the other one is removed first
esac

# NCCL: HOROVOD_NCCL_HOME, else the system's (Debian/Ubuntu libnccl-dev).
find_nccl() {
  local home homes=(/usr /usr/local)
  [[ -n ${HOROVOD_NCCL_HOME:-} ]] && homes=("$HOROVOD_NCCL_HOME")  # the user said where
  for home in "${homes[@]}"; do
    [[ -f $home/include/nccl.h ]] || continue
    if compgen -G "$home/lib/libnccl.so*" >/dev/null || compgen -G "$home/lib/*/libnccl.so*" >/dev/null \
      || compgen -G "$home/lib64/libnccl.so*" >/dev/null; then
      echo "$home"; return
    fi
  done
}
find_nvcc() {  # the CUDA compiler, if one runs (Horovod's GPU operations need it)
  local nvcc
  for nvcc in "${HOROVOD_CUDA_HOME:-${CUDA_HOME:-/usr/local/cuda}}/bin/nvcc" "$(command -v nvcc || true)"; do
    if [[ -n $nvcc && -x $nvcc ]] && "$nvcc" --version >/dev/null 2>&1; then echo "$nvcc"; return; fi
  done
}
NCCL_HOME="$(find_nccl)"
NVCC="$(find_nvcc)"
if [[ -n ${HOROVOD_GPU_OPERATIONS+x} ]]; then
  GPU_OPS="$HOROVOD_GPU_OPERATIONS"
  OPS_WHY="from HOROVOD_GPU_OPERATIONS"
elif [[ $GPU_COUNT -eq 0 ]]; then
  GPU_OPS=""
  OPS_WHY="no GPU: collectives through Gloo in host memory"
elif [[ -n $NCCL_HOME && -n $NVCC ]]; then
  GPU_OPS="NCCL"
  OPS_WHY="NCCL in $NCCL_HOME, CUDA compiler $NVCC"
else
  GPU_OPS=""
  missing=()
  [[ -n $NCCL_HOME ]] || missing+=("NCCL (apt-get install libnccl-dev, or set HOROVOD_NCCL_HOME)")
  [[ -n $NVCC ]] || missing+=("the CUDA toolkit's nvcc (set CUDA_HOME)")
  OPS_WHY="NOT NCCL: ${missing[*]} not found, so Horovod's all-reduce goes through host memory (Gloo), much slower between GPUs; install them and run make install again"
fi
OPS_KEY="${GPU_OPS:-cpu}"
OPS_KEY="${OPS_KEY,,}"

PY="$(pick_python)"
PY_VERSION="$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
PY_TAG="cp${PY_VERSION/./}"
# The stamp names everything that changes what gets installed.
STAMP_KEY="$(printf '%s\n' "$(cat "${BASH_SOURCE[0]}" "$ROOT/pyproject.toml" | sha1sum | cut -c1-40)" "$TF_PACKAGE" "$OPS_KEY" \
  "$PY_VERSION" "$FAISS_PACKAGE" | sha1sum | cut -c1-12)"
STAMP="$VENV/.installed-$STAMP_KEY"
# The wheel's key: Horovod, the TensorFlow package it was built against (tensorflow-cpu
# or the CUDA build, tensorflow) and its version, Python and the GPU operations.
TF_DIST="$(basename "${TF_PACKAGE%%[[=<>~! ]*}")"  # a wheel file given as TF_PACKAGE: its name
wheel_key() { echo "horovod-${HOROVOD_VERSION}-${TF_DIST}-$1-${PY_TAG}-${OPS_KEY}"; }

if [[ $PLAN -eq 1 ]]; then
  # The TensorFlow version is known once installed: the plan uses the installed one, if any.
  TF_INSTALLED="$("$VENV/bin/python" -c 'import tensorflow as tf; print(tf.__version__)' 2>/dev/null || true)"
  if [[ -f $STAMP ]]; then venv_plan="up to date ($(cat "$STAMP"))"
  elif [[ -x $VENV/bin/python ]]; then venv_plan="install into the existing $VENV (settings changed or never completed)"
  else venv_plan="create $VENV with Python $PY_VERSION"; fi
  if [[ -n $TF_INSTALLED ]]; then
    key="$(wheel_key "$TF_INSTALLED")"
    if compgen -G "$CACHE/$key/horovod-*.whl" >/dev/null; then wheel_plan="cached in $CACHE/$key"
    else wheel_plan="build from source once, then cache in $CACHE/$key"; fi
  else
    wheel_plan="build from source once (or reuse) in $CACHE/$(wheel_key '<TF version>')"
  fi
  echo "machine:          $MACHINE"
  echo "tensorflow:       $TF_PACKAGE ($TF_WHY)"
  echo "faiss:            $FAISS_PACKAGE ($([[ $FAISS_PACKAGE == "$DEFAULT_FAISS" ]] && echo 'default for this machine' || echo 'from FAISS_PACKAGE'))"
  echo "horovod:          $HOROVOD_VERSION with TensorFlow and Gloo, MPI off"
  echo "gpu operations:   ${GPU_OPS:-none} ($OPS_WHY)"
  echo "horovod wheel:    $wheel_plan"
  echo "venv:             $venv_plan"
  exit 0
fi

if [[ -f "$STAMP" ]]; then
  exit 0
fi
if [[ $GPU_COUNT -gt 0 && -z $GPU_OPS ]]; then
  log "WARNING: Horovod gets no GPU operations: $OPS_WHY"
fi
PY_PACKAGES=(
  "$TF_PACKAGE" "tensorboard" "absl-py>=1.0" "gin-config>=0.5" "scikit-learn>=1.3"
  "numpy" "pillow" "pytest>=7" "pytest-xdist>=3" "ruff"
  "$FAISS_PACKAGE" "matplotlib==3.11.2"  # approximate search; the ROC curve in TensorBoard
  "mkdocs==1.6.1" "mkdocs-material==9.8.2"  # the documentation site (make docs)
  # Horovod's runtime dependencies, installed here because its wheel is installed --no-deps.
  "cloudpickle" "psutil" "pyyaml" "packaging"
)

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

if [[ ! -x "$VENV/bin/python" ]]; then
  log "creating $VENV with $($PY --version 2>&1)"
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)
"${PIP[@]}" install -q --upgrade pip wheel "setuptools<81"
if "${PIP[@]}" show -q "$OTHER_TF" >/dev/null 2>&1; then
  log "removing $OTHER_TF (it shares the tensorflow/ folder with $TF_PACKAGE)"
  "${PIP[@]}" uninstall -q -y "$OTHER_TF"
fi
log "installing Python packages (${TF_PACKAGE}, tensorboard, absl-py, gin-config, ...)"
"${PIP[@]}" install -q "${PY_PACKAGES[@]}"

TF_VERSION="$("$VENV/bin/python" -c 'import tensorflow as tf; print(tf.__version__)' 2>/dev/null)"
KEY="$(wheel_key "$TF_VERSION")"
mkdir -p "$CACHE/$KEY"
WHEEL="$(ls "$CACHE/$KEY"/horovod-*.whl 2>/dev/null | head -n1 || true)"

if [[ -z "$WHEEL" ]]; then
  need_system_packages
  BUILD="$(mktemp -d)"
  trap 'rm -rf "$BUILD"' EXIT
  log "building Horovod ${HOROVOD_VERSION} for TensorFlow ${TF_VERSION} (${PY_TAG}, GPU operations: ${GPU_OPS:-none}); takes ~10 min once, then cached in $CACHE/$KEY"
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
    export HOROVOD_GPU_OPERATIONS="$GPU_OPS"
    if [[ -n $GPU_OPS ]]; then
      [[ -n $NCCL_HOME ]] && export HOROVOD_NCCL_HOME="$NCCL_HOME"
      [[ -n $NVCC ]] && export HOROVOD_CUDA_HOME="$(dirname "$(dirname "$NVCC")")"
    fi
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

# The project itself, editable: `import losses`, `python -m trainer.main` and the shipped
# configs work from any folder, and edits in the checkout take effect without reinstalling.
log "installing the project into $VENV (editable)"
"${PIP[@]}" install -q --no-deps --no-build-isolation -e "$ROOT"

log "checking the Horovod build"
CHECK="$("$VENV/bin/horovodrun" --check-build)"
printf '%s\n' "$CHECK" | sed 's/^/[install]   /' >&2
# One line of what was installed, kept in the stamp (--plan shows it).
HOROVOD_BUILT="$(printf '%s\n' "$CHECK" | awk '
  /^Available Frameworks:/ { part = "frameworks" } /^Available Controllers:/ { part = "controllers" }
  /^Available Tensor Operations:/ { part = "tensor operations" }
  /\[X\]/ { list[part] = list[part] (list[part] ? ", " : "") $2 }
  END { printf "frameworks %s; controllers %s; tensor operations %s", list["frameworks"], list["controllers"], list["tensor operations"] }')"
# --check-build marks PyTorch even when torch is not installed (it is not: the build has
# HOROVOD_WITHOUT_PYTORCH); say only what can be imported.
if ! "$VENV/bin/python" -c 'import torch' >/dev/null 2>&1; then
  HOROVOD_BUILT="${HOROVOD_BUILT/TensorFlow, PyTorch/TensorFlow}"
fi
TF_BUILD="$("$VENV/bin/python" - <<'PY'
import tensorflow as tf

b = tf.sysconfig.get_build_info()
cuda = f"CUDA {b.get('cuda_version')} / cuDNN {b.get('cudnn_version')} build"
print(cuda if b.get("is_cuda_build") else "CPU build")
PY
)"
FAISS_BUILT="$("$VENV/bin/python" -c 'import faiss; print(faiss.__version__, "GPU build" if hasattr(faiss, "StandardGpuResources") else "CPU build")')"
DOCS_BUILT="$("$VENV/bin/python" -c 'from importlib.metadata import version as v; print(v("mkdocs"), "(Material " + v("mkdocs-material") + ")")')"
SUMMARY="TensorFlow $TF_VERSION ($TF_BUILD, $TF_PACKAGE); Horovod $HOROVOD_VERSION ($HOROVOD_BUILT); faiss $FAISS_BUILT; MkDocs $DOCS_BUILT"
rm -f "$VENV"/.installed-*
printf '%s\n' "$SUMMARY" > "$STAMP"
log "installed: $SUMMARY"
if [[ $GPU_COUNT -gt 0 && $TF_BUILD == "CPU build" ]]; then
  log "WARNING: this machine has GPUs but $TF_PACKAGE is a CPU build: jobs will run on the CPU"
fi
log "done: $VENV (python -m trainer.doctor checks it)"
