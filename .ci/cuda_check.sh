#!/usr/bin/env bash
# Proves the CUDA kernels compile and link on a machine without a GPU: builds perturbdiff against
# the CUDA build of torch in a separate venv with PERTURBDIFF_FORCE_CUDA=1, imports the extension
# and checks every op has a kernel for the CUDA dispatch key.
#
# The venv (torch==2.14.1 with CUDA, ~5.5 GB, installed from the local package mirror) is cached at
# $PERTURBDIFF_CUDA_VENV (default ~/.cache/perturbdiff/cuda-venv) and rebuilt whenever it no longer
# imports a CUDA torch of that version, so a fresh machine gets the same result, only slower.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PERTURBDIFF_CUDA_VENV:-$HOME/.cache/perturbdiff/cuda-venv}"
TORCH_CUDA="2.14.1"
# One architecture proves compilation and linking; a release build sets TORCH_CUDA_ARCH_LIST.
ARCHS="${TORCH_CUDA_ARCH_LIST:-9.0}"
OPS="pairwise_mmd pairwise_mmd_backward kme kme_backward rff_embed rff_embed_backward"
START=$(date +%s)
log() { echo "[cuda_check +$(( $(date +%s) - START ))s] $*"; }

venv_works() {
  [ -x "$VENV/bin/python" ] && "$VENV/bin/python" - "$TORCH_CUDA" <<'EOF' 2>/dev/null
import sys, torch
sys.exit(0 if torch.__version__.split("+")[0] == sys.argv[1] and torch.version.cuda else 1)
EOF
}

if venv_works; then
  log "reusing $VENV"
else
  log "creating $VENV (torch==$TORCH_CUDA, CUDA build)"
  rm -rf "$VENV.tmp"
  python3 -m venv "$VENV.tmp"
  "$VENV.tmp/bin/python" -m pip install -q "torch==$TORCH_CUDA" numpy setuptools wheel
  rm -rf "$VENV"
  mv "$VENV.tmp" "$VENV"  # only a complete venv gets the cached name
  venv_works || { echo "cuda_check: the new venv does not import a CUDA torch $TORCH_CUDA" >&2; exit 1; }
fi
PY="$VENV/bin/python"

# The toolkit (nvcc, cudart) is the system's; torch's CUDA wheels ship the other libraries and
# headers (cuBLAS, cuSPARSE, ...) under nvidia/cu13, with versioned names only, so CMake gets
# unversioned links to them.
NVCC="$(command -v nvcc || true)"
[ -n "$NVCC" ] || { echo "cuda_check: nvcc is not on PATH" >&2; exit 1; }
# nvcc on PATH may be a wrapper script outside the toolkit: prefer CUDA_HOME, then /usr/local/cuda.
CUDA_ROOT="${CUDA_HOME:-/usr/local/cuda}"
[ -x "$CUDA_ROOT/bin/nvcc" ] || CUDA_ROOT="$(dirname "$(dirname "$(readlink -f "$NVCC")")")"
[ -f "$CUDA_ROOT/include/cuda_runtime.h" ] || { echo "cuda_check: no CUDA toolkit found (set CUDA_HOME)" >&2; exit 1; }
NV="$("$PY" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')"

WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/cuda-libs"
for lib in "$NV"/lib/lib*.so.*; do
  base="$(basename "$lib")"
  ln -sf "$lib" "$WORK/cuda-libs/${base%%.so.*}.so"
done
export CUDACXX="$CUDA_ROOT/bin/nvcc"
export PERTURBDIFF_FORCE_CUDA=1
export TORCH_CUDA_ARCH_LIST="$ARCHS"
export MAX_JOBS="${MAX_JOBS:-2}"
export CPLUS_INCLUDE_PATH="$NV/include${CPLUS_INCLUDE_PATH:+:$CPLUS_INCLUDE_PATH}"
export PERTURBDIFF_CMAKE_ARGS="-DCUDA_TOOLKIT_ROOT_DIR=$CUDA_ROOT -DCUDAToolkit_ROOT=$CUDA_ROOT \
  -DCMAKE_CUDA_FLAGS=-I$NV/include -DCMAKE_LIBRARY_PATH=$WORK/cuda-libs"

# Build from a copy so this build never touches the checkout's CPU build (perturbdiff/_C*.so).
mkdir -p "$WORK/src"
tar -C "$ROOT" --exclude=./build --exclude=./.git --exclude='*.so' --exclude=__pycache__ -cf - . | tar -C "$WORK/src" -xf -
log "building with PERTURBDIFF_FORCE_CUDA=1, TORCH_CUDA_ARCH_LIST=$ARCHS"
"$PY" -m pip install -q --no-build-isolation --no-deps "$WORK/src" > "$WORK/build.log" 2>&1 || {
  grep -A12 -E "CMake (Error|Warning)" "$WORK/build.log" >&2 || true
  grep -B2 -A6 -E "error:|error [A-Z]|FAILED" "$WORK/build.log" | head -80 >&2 || true
  tail -15 "$WORK/build.log" >&2
  echo "cuda_check: the CUDA build failed" >&2
  exit 1
}

log "checking the CUDA kernels are registered"
cd "$WORK"  # not the checkout: import the installed package
"$PY" - $OPS <<'EOF'
import json, sys, torch
import perturbdiff
assert perturbdiff.has_extension(), perturbdiff.extension_error()
info = json.loads(torch.ops.perturbdiff.build_info())
assert info["cuda"], info
missing = [op for op in sys.argv[1:]
           if not torch._C._dispatch_has_kernel_for_dispatch_key(f"perturbdiff::{op}", "CUDA")]
assert not missing, f"no CUDA kernel registered for {missing}"
print(f"CUDA kernels registered for {sys.argv[1:]}; build info {info}")
EOF
"$PY" -m pip uninstall -q -y perturbdiff
log "ok"
