#!/usr/bin/env bash
# Create .venv at the repo root (if missing) and install dist_sparse_attn into it.
#
#   bash launch/setup.sh            # idempotent: only installs what is missing
#
# Order matters: torch first, so that nothing later makes pip resolve another torch
# (on PyPI, torch for Linux is the multi-GB CUDA build).
#   * If the interpreter that creates the venv already has torch (GPU hosts:
#     torch + Triton preinstalled), the venv sees its site-packages and that
#     torch is used as is.
#   * Otherwise torch==2.13.0 is installed: on a machine without an NVIDIA GPU (no
#     nvidia-smi, no /dev/nvidia*) the CPU wheel from PyTorch's CPU index
#     (TORCH_INDEX_URL, default https://download.pytorch.org/whl/cpu); when that
#     index cannot be reached (or lacks the version), from pip's configured index,
#     with a one-line note. With a GPU, from pip's configured index (CUDA build).
#   * Each later step installs only the packages that do not import yet.
#   * Offline host: PIP_NO_INDEX=1 PIP_FIND_LINKS=/path/to/wheels bash launch/setup.sh
#     (pip then installs only from that folder of wheels).
# Env: PYTHON (interpreter creating the venv, default python3), VENV (default .venv),
#      TORCH_INDEX_URL (CPU-only machines; empty: use pip's configured index).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off
t0=$(date +%s)

say() { echo "[setup] $*"; }

if [ ! -x "$VENV/bin/python" ]; then
    if "$PYTHON" -c "import torch" 2>/dev/null; then
        say "creating $VENV with system site-packages (reusing the host's torch)"
        "$PYTHON" -m venv --system-site-packages "$VENV"
    else
        say "creating $VENV"
        "$PYTHON" -m venv "$VENV"
    fi
fi
case "$VENV" in
    /*) PY="$VENV/bin/python" ;;
    *)  PY="$ROOT/$VENV/bin/python" ;;
esac

PIP_ARGS=(-q)
# pip warns once per project about every configured local index that lacks it;
# drop those lines only (errors and other warnings stay visible).
pip_install() {
    "$PY" -m pip install "${PIP_ARGS[@]}" "$@" 2>&1 \
        | { grep -v "^WARNING: Location 'file://.*' is ignored: it is neither a file nor a directory" || true; }
}

# Print the pip names of the modules (given as module=pip-name) that do not import.
missing() {
    local spec out=()
    for spec in "$@"; do
        "$PY" -c "import ${spec%%=*}" >/dev/null 2>&1 || out+=("${spec#*=}")
    done
    echo "${out[@]:-}"
}

install_missing() {     # install_missing mod=pip-name ...
    local pkgs
    pkgs="$(missing "$@")"
    if [ -n "$pkgs" ]; then
        say "pip install $pkgs"
        # shellcheck disable=SC2086  # word splitting of the package list is intended
        pip_install $pkgs
    fi
}

has_gpu() {
    command -v nvidia-smi >/dev/null 2>&1 && return 0
    compgen -G "/dev/nvidia[0-9]*" >/dev/null 2>&1
}

# Whether pip can use the index $1 (a quick look, so an unreachable index costs seconds).
index_reachable() {
    "$PY" -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1].rstrip('/') + '/torch/', timeout=10)" \
        "$1" >/dev/null 2>&1
}

# 1. torch first, only where none imports: the CPU wheel on machines without a GPU.
TORCH=torch==2.13.0
TORCH_INDEX_URL="${TORCH_INDEX_URL-https://download.pytorch.org/whl/cpu}"
if [ -n "$(missing torch=torch)" ]; then
    if ! has_gpu && [ -n "$TORCH_INDEX_URL" ] && [ -z "${PIP_NO_INDEX:-}" ] \
            && index_reachable "$TORCH_INDEX_URL"; then
        say "pip install $TORCH (CPU wheel, --index-url $TORCH_INDEX_URL)"
        if ! pip_install --index-url "$TORCH_INDEX_URL" --timeout 60 "$TORCH"; then
            say "note: $TORCH_INDEX_URL did not provide $TORCH; installing it from pip's configured index"
            pip_install "$TORCH"
        fi
    else
        if ! has_gpu && [ -n "$TORCH_INDEX_URL" ] && [ -z "${PIP_NO_INDEX:-}" ]; then
            say "note: $TORCH_INDEX_URL cannot be reached; installing $TORCH from pip's configured index"
        fi
        say "pip install $TORCH"
        pip_install "$TORCH"
    fi
fi
# 2. the Triton that torch 2.13 pins (plain `pip install triton` gives 3.9, which lacks APIs we use).
install_missing triton=triton==3.7.1
# 3. test, benchmark and distributed dependencies.
install_missing numpy=numpy pytest=pytest pytest_timeout=pytest-timeout matplotlib=matplotlib
if ! "$PY" -c "import tomllib" >/dev/null 2>&1; then    # Python 3.10: the TOML reader
    install_missing tomli=tomli
fi
install_missing deepspeed=deepspeed
install_missing mpi4py.MPI="mpich mpi4py"     # mpi4py.MPI fails to import without an MPI library
# Hugging Face transformers for dist_sparse_attn.integrations.transformers (5.25 needs a
# package the index may lack; 5.24.0 is tested)
install_missing transformers=transformers==5.24.0
# 4. the package itself, editable, without letting pip touch torch/triton (the dsa-train
#    command comes with it). pyproject.toml needs setuptools >= 77 (PEP 639 license
#    fields): with an older one pip builds in an isolated environment (needs an index).
say "pip install --no-deps -e ."
if "$PY" -c "import setuptools, sys; v = tuple(int(x) for x in setuptools.__version__.split('.')[:2]); sys.exit(v < (77, 0))" 2>/dev/null; then
    pip_install --no-deps --no-build-isolation -e .       # works offline
else
    pip_install --no-deps -e .
fi

# 5. without CUDA, DeepSpeed builds a C++ op (deepspeed_shm_comm, needs g++) the first time
#    it starts torch.distributed: build it now, once, instead of inside the first run.
if ! has_gpu; then
    say "building DeepSpeed's CPU communication op (once, about a minute)"
    if ! "$PY" -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" >/dev/null 2>&1; then
        say "note: DeepSpeed's CPU communication op did not build here; DeepSpeed will try again at its first start"
    fi
fi

"$PY" - <<'PY'
import torch, triton, dist_sparse_attn
print(f"[setup] ok: torch {torch.__version__} (cuda {torch.cuda.is_available()}), "
      f"triton {triton.__version__}, dist_sparse_attn {dist_sparse_attn.__version__}")
PY
say "done in $(( $(date +%s) - t0 )) s; python: $PY"
