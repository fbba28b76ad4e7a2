#!/usr/bin/env bash
# Set up the peer tools we measure lowbit against, each in its own venv under bench/ of a repo
# (never in .venv, so their pins cannot leak into ours):
#   bench/.venv-llamacpp  llama-cpp-python built from source (CPU, -march=native; it vendors
#                         llama.cpp + ggml), numpy, gguf  -> bench/peers/llamacpp_ref.py, ggml_ref.py
#   bench/.venv-llmc      llmcompressor on the local CPU torch wheel
#
# usage: bash bench/setup_peers.sh [llamacpp|llmc|all] [REPO_ROOT]
#   REPO_ROOT defaults to the git top level of the current directory, so running this script from
#   another worktree with cwd=<main checkout> installs into <main checkout>/bench.
# Idempotent: a venv whose stamp file records the same pins is skipped. Re-run with
# PEERS_FORCE=1 to rebuild. PEERS_JOBS (default 2) caps the C++ build's parallel jobs.
set -euo pipefail

what="${1:-all}"
case "$what" in llamacpp|llmc|all) ;; *)
    echo "usage: $0 [llamacpp|llmc|all] [REPO_ROOT]" >&2; exit 2;;
esac
root="${2:-$(git rev-parse --show-toplevel)}"
root="$(cd "$root" && pwd)"

PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
JOBS="${PEERS_JOBS:-2}"
FORCE="${PEERS_FORCE:-0}"

# ---- pins (the versions this script was last run with; see bench/peers/README.md) ----
LLAMA_CPP_PYTHON_VERSION=0.3.36
GGUF_VERSION=0.19.0
NUMPY_SPEC="numpy==2.4.6"
# The CPU build of torch is a local wheel on our machines; anything looser pulls CUDA wheels.
TORCH_SPEC="torch==2.13.0"
LLMCOMPRESSOR_VERSION=0.14.0.1
# CPU-only, lean: no CUDA/BLAS, no mtmd/llava, server, tools, tests or examples.
LLAMA_CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_CUDA=OFF -DGGML_BLAS=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF"

say() { echo "[setup_peers] $*"; }

# done_already VENV PINS: true when VENV's stamp records exactly PINS (and not forced)
done_already() {
    local stamp="$1/.peers-stamp"
    [[ "$FORCE" != 1 && -f "$stamp" ]] && [[ "$(head -n 1 "$stamp")" == "$2" ]]
}

make_venv() {
    local venv="$1"
    if [[ -d "$venv" ]]; then
        say "removing stale $venv"; rm -rf "$venv"
    fi
    say "creating $venv with $($PYTHON --version)"
    "$PYTHON" -m venv "$venv"
    "$venv/bin/pip" install -q --upgrade pip
}

setup_llamacpp() {
    local venv="$root/bench/.venv-llamacpp"
    local pins="llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION gguf==$GGUF_VERSION $NUMPY_SPEC cmake=[$LLAMA_CMAKE_ARGS]"
    if done_already "$venv" "$pins"; then
        say "llamacpp: up to date in $venv ($(sed -n 2p "$venv/.peers-stamp"))"; return
    fi
    make_venv "$venv"
    "$venv/bin/pip" install -q "$NUMPY_SPEC" "gguf==$GGUF_VERSION"
    say "llamacpp: building llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION from source with $JOBS jobs"
    say "  CMAKE_ARGS=$LLAMA_CMAKE_ARGS"
    local t0=$SECONDS
    CMAKE_ARGS="$LLAMA_CMAKE_ARGS" CMAKE_BUILD_PARALLEL_LEVEL="$JOBS" FORCE_CMAKE=1 \
        "$venv/bin/pip" install --no-cache-dir --no-binary llama-cpp-python \
        "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" "$NUMPY_SPEC"
    local secs=$((SECONDS - t0))
    # smoke: the bindings load their shared libraries and ggml reports the CPU features it uses
    "$venv/bin/python" -c "import llama_cpp, gguf, numpy; print('llama_cpp', llama_cpp.__version__, 'gguf', gguf.__version__ if hasattr(gguf,'__version__') else '$GGUF_VERSION', 'numpy', numpy.__version__); print(llama_cpp.llama_print_system_info().decode())"
    printf '%s\nbuilt %s in %ss with %s jobs\n' "$pins" "$(date -u +%FT%TZ)" "$secs" "$JOBS" > "$venv/.peers-stamp"
    "$venv/bin/pip" freeze > "$venv/.peers-freeze.txt"
    say "llamacpp: done in ${secs}s -> $venv (pip freeze in $venv/.peers-freeze.txt)"
}

setup_llmc() {
    local venv="$root/bench/.venv-llmc"
    local pins="$TORCH_SPEC llmcompressor==$LLMCOMPRESSOR_VERSION"
    if done_already "$venv" "$pins"; then
        say "llmc: up to date in $venv ($(sed -n 2p "$venv/.peers-stamp"))"; return
    fi
    make_venv "$venv"
    local t0=$SECONDS
    # torch FIRST, then llmcompressor with torch held to the same pin so pip can't swap in CUDA torch
    "$venv/bin/pip" install -q "$TORCH_SPEC"
    local constraints="$venv/.peers-constraints.txt"
    echo "$TORCH_SPEC" > "$constraints"
    "$venv/bin/pip" install -q -c "$constraints" "llmcompressor==$LLMCOMPRESSOR_VERSION"
    local secs=$((SECONDS - t0))
    "$venv/bin/python" - <<'EOF'
import torch, llmcompressor, compressed_tensors, transformers
assert "+cpu" in torch.__version__ or not torch.version.cuda, f"CUDA torch slipped in: {torch.__version__}"
print("torch", torch.__version__, "llmcompressor", llmcompressor.__version__,
      "compressed_tensors", compressed_tensors.__version__, "transformers", transformers.__version__)
EOF
    printf '%s\ninstalled %s in %ss\n' "$pins" "$(date -u +%FT%TZ)" "$secs" > "$venv/.peers-stamp"
    "$venv/bin/pip" freeze > "$venv/.peers-freeze.txt"
    say "llmc: done in ${secs}s -> $venv (pip freeze in $venv/.peers-freeze.txt)"
}

say "repo root: $root"
mkdir -p "$root/bench"
case "$what" in
    llamacpp) setup_llamacpp ;;
    llmc) setup_llmc ;;
    all) setup_llamacpp; setup_llmc ;;
esac
say "all requested peers ready"
