#!/usr/bin/env bash
# Set up the peer tools we measure lowbit against, each in its own venv under bench/ of a repo
# (never in .venv, so their pins cannot leak into ours):
#   bench/.venv-llamacpp  llama-cpp-python built from source (CPU, -march=native; it vendors
#                         llama.cpp + ggml), numpy, gguf  -> bench/peers/llamacpp_ref.py, ggml_ref.py
#   bench/.venv-llmc      llmcompressor on the local CPU torch wheel (+ compressed-tensors, auto-round)
#   bench/.venv-ort       onnxruntime (CPU) + onnx + numpy           -> bench/peers/ort_run.py
#   bench/.venv-gptq      GPTQModel (torch/CPU kernels) on the local CPU torch wheel, so that
#                         transformers loads quant_method gptq/awq checkpoints -> bench/peers/load_check.py
#   bench/.venv-bnb       bitsandbytes (CPU backend) + transformers + accelerate + peft on the local CPU
#                         torch wheel: load_in_4bit / 8-bit loading and PEFT adapters -> bench/peers/bnb_peer.py
#
# usage: bash bench/setup_peers.sh [llamacpp|llmc|ort|gptq|bnb|all] [REPO_ROOT]
#   REPO_ROOT defaults to the git top level of the current directory, so running this script from
#   another worktree with cwd=<main checkout> installs into <main checkout>/bench.
# Idempotent: a venv whose stamp file records the same pins is skipped. Re-run with
# PEERS_FORCE=1 to rebuild. PEERS_JOBS (default 2) caps the C++ build's parallel jobs.
set -euo pipefail

what="${1:-all}"
case "$what" in llamacpp|llmc|ort|gptq|bnb|all) ;; *)
    echo "usage: $0 [llamacpp|llmc|ort|gptq|bnb|all] [REPO_ROOT]" >&2; exit 2;;
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
ONNXRUNTIME_VERSION=1.32.0
ONNX_VERSION=1.23.2
# 7.7.0 (newest) requires torch>=2.14.1 and transformers>=5.20.2; 7.6.0 is the newest that accepts
# our torch 2.13.0 CPU wheel. Pure-Python sdist: no extension is compiled at install time (its
# C++/CUDA kernels are JIT-built on first use where a GPU is present); on CPU it uses its torch kernel.
GPTQMODEL_VERSION=7.6.0
GPTQ_NUMPY_SPEC="numpy==2.2.6"   # gptqmodel 7.6.0 pins numpy==2.2.6 on python<3.14
# transformers' GptqHfQuantizer (quant_method gptq) refuses to load without optimum (optimum.gptq
# converts the model's Linears to gptqmodel's QuantLinear); gptqmodel's own `hf` extra is optimum.
OPTIMUM_VERSION=2.3.0
# bitsandbytes >= 0.48 has a CPU backend for 4-bit (nf4/fp4) and 8-bit (LLM.int8) layers.
BNB_VERSION=0.50.2
PEFT_SPEC="peft"
# CPU-only, lean: no CUDA/BLAS, no mtmd/llava, server, tools, tests or examples.
# Not GGML_NATIVE: on CPUs with AMX (Sapphire Rapids and later) -march=native turns on ggml's AMX
# matmul, which segfaults here (ggml_backend_amx_mul_mat, seen 2026-12-01 on every quantized model);
# so the x86 ISA levels are named one by one, AMX off. A CPU without AVX-512 falls back to AVX2 at
# run time only if GGML_CPU_ALL_VARIANTS is used; set LLAMA_CMAKE_ARGS to override.
# Each level is ON only where /proc/cpuinfo lists it: AMD Zen 4 has AVX-512 VNNI but not the
# VEX-encoded AVX-VNNI, and a build with GGML_AVX_VNNI=ON dies there with SIGILL (seen 2026-12-02).
cpu_has() { grep -m1 -E '^flags' /proc/cpuinfo 2>/dev/null | tr ' ' '\n' | grep -qx "$1" && echo ON || echo OFF; }
LLAMA_CPU_FLAGS="-DGGML_AVX=$(cpu_has avx) -DGGML_AVX2=$(cpu_has avx2) -DGGML_FMA=$(cpu_has fma) -DGGML_F16C=$(cpu_has f16c) -DGGML_BMI2=$(cpu_has bmi2) -DGGML_AVX_VNNI=$(cpu_has avx_vnni) -DGGML_AVX512=$(cpu_has avx512f) -DGGML_AVX512_VBMI=$(cpu_has avx512vbmi) -DGGML_AVX512_VNNI=$(cpu_has avx512_vnni) -DGGML_AVX512_BF16=$(cpu_has avx512_bf16)"
LLAMA_CMAKE_ARGS="${LLAMA_CMAKE_ARGS:--DGGML_NATIVE=OFF $LLAMA_CPU_FLAGS -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DGGML_CUDA=OFF -DGGML_BLAS=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_CURL=OFF}"

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
    # LLAMACPP_VENV: another venv for a second build, e.g. AVX2 only for the AVX2 comparison:
    #   LLAMACPP_VENV=bench/.venv-llamacpp-avx2 LLAMA_CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON ..."
    local venv="$root/${LLAMACPP_VENV:-bench/.venv-llamacpp}"
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

setup_ort() {
    local venv="$root/bench/.venv-ort"
    local pins="onnxruntime==$ONNXRUNTIME_VERSION onnx==$ONNX_VERSION $NUMPY_SPEC"
    if done_already "$venv" "$pins"; then
        say "ort: up to date in $venv ($(sed -n 2p "$venv/.peers-stamp"))"; return
    fi
    make_venv "$venv"
    local t0=$SECONDS
    "$venv/bin/pip" install -q "onnxruntime==$ONNXRUNTIME_VERSION" "onnx==$ONNX_VERSION" "$NUMPY_SPEC"
    local secs=$((SECONDS - t0))
    "$venv/bin/python" - <<'EOF'
import numpy, onnx, onnxruntime as ort
print("onnxruntime", ort.__version__, "onnx", onnx.__version__, "numpy", numpy.__version__,
      "providers", ort.get_available_providers())
assert "CPUExecutionProvider" in ort.get_available_providers()
EOF
    printf '%s\ninstalled %s in %ss\n' "$pins" "$(date -u +%FT%TZ)" "$secs" > "$venv/.peers-stamp"
    "$venv/bin/pip" freeze > "$venv/.peers-freeze.txt"
    say "ort: done in ${secs}s -> $venv (pip freeze in $venv/.peers-freeze.txt)"
}

setup_gptq() {
    local venv="$root/bench/.venv-gptq"
    local pins="$TORCH_SPEC gptqmodel==$GPTQMODEL_VERSION optimum==$OPTIMUM_VERSION $GPTQ_NUMPY_SPEC"
    if done_already "$venv" "$pins"; then
        say "gptq: up to date in $venv ($(sed -n 2p "$venv/.peers-stamp"))"; return
    fi
    make_venv "$venv"
    local t0=$SECONDS
    # torch FIRST and held by a constraint (as for llmc): gptqmodel must not pull a CUDA torch
    "$venv/bin/pip" install -q "$TORCH_SPEC"
    local constraints="$venv/.peers-constraints.txt"
    echo "$TORCH_SPEC" > "$constraints"
    "$venv/bin/pip" install -q -c "$constraints" "gptqmodel==$GPTQMODEL_VERSION" \
        "optimum==$OPTIMUM_VERSION" "$GPTQ_NUMPY_SPEC"
    local secs=$((SECONDS - t0))
    "$venv/bin/python" - <<'EOF'
import torch, gptqmodel, optimum.gptq, transformers
assert "+cpu" in torch.__version__ or not torch.version.cuda, f"CUDA torch slipped in: {torch.__version__}"
print("torch", torch.__version__, "gptqmodel", gptqmodel.__version__, "transformers", transformers.__version__)
EOF
    printf '%s\ninstalled %s in %ss\n' "$pins" "$(date -u +%FT%TZ)" "$secs" > "$venv/.peers-stamp"
    "$venv/bin/pip" freeze > "$venv/.peers-freeze.txt"
    say "gptq: done in ${secs}s -> $venv (pip freeze in $venv/.peers-freeze.txt)"
}

setup_bnb() {
    local venv="$root/bench/.venv-bnb"
    local pins="$TORCH_SPEC bitsandbytes==$BNB_VERSION $PEFT_SPEC transformers accelerate safetensors"
    if done_already "$venv" "$pins"; then
        say "bnb: up to date in $venv ($(sed -n 2p "$venv/.peers-stamp"))"; return
    fi
    make_venv "$venv"
    local t0=$SECONDS
    # torch FIRST and held by a constraint (as for llmc): bitsandbytes/peft must not pull a CUDA torch
    "$venv/bin/pip" install -q "$TORCH_SPEC"
    local constraints="$venv/.peers-constraints.txt"
    echo "$TORCH_SPEC" > "$constraints"
    "$venv/bin/pip" install -q -c "$constraints" "bitsandbytes==$BNB_VERSION" "$PEFT_SPEC" \
        transformers accelerate safetensors
    local secs=$((SECONDS - t0))
    # smoke: bitsandbytes' CPU backend quantizes and dequantizes NF4 (no GPU here)
    "$venv/bin/python" - <<'EOF2'
import torch, bitsandbytes as bnb, bitsandbytes.functional as F, transformers, peft
assert "+cpu" in torch.__version__ or not torch.version.cuda, f"CUDA torch slipped in: {torch.__version__}"
w = torch.randn(64, 128)
q, st = F.quantize_4bit(w, quant_type="nf4", blocksize=64, compress_statistics=True)
err = (F.dequantize_4bit(q, st) - w).abs().max().item()
assert err < 1.0, err
print("torch", torch.__version__, "bitsandbytes", bnb.__version__, "transformers", transformers.__version__,
      "peft", peft.__version__, "nf4 cpu max err", round(err, 4))
EOF2
    printf '%s\ninstalled %s in %ss\n' "$pins" "$(date -u +%FT%TZ)" "$secs" > "$venv/.peers-stamp"
    "$venv/bin/pip" freeze > "$venv/.peers-freeze.txt"
    say "bnb: done in ${secs}s -> $venv (pip freeze in $venv/.peers-freeze.txt)"
}

say "repo root: $root"
mkdir -p "$root/bench"
case "$what" in
    llamacpp) setup_llamacpp ;;
    llmc) setup_llmc ;;
    ort) setup_ort ;;
    gptq) setup_gptq ;;
    bnb) setup_bnb ;;
    all) setup_llamacpp; setup_llmc; setup_ort; setup_gptq; setup_bnb ;;
esac
say "all requested peers ready"
