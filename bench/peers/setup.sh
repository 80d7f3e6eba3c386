#!/usr/bin/env bash
# Creates one virtualenv per peer system under bench/.venvs/<name>.
# Idempotent: a venv whose requirement line is unchanged and whose import check
# passed before (bench/.venvs/<name>/.millis-ok) is left alone.
# A venv that fails to install or to import is recorded in
# bench/.venvs/<name>/.millis-fail (one line: the reason); the harness reads it
# and records that peer as skipped instead of crashing.
# Usage: bash bench/peers/setup.sh [name ...]     (default: all peers)
set -u
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENVS="$(cd "$HERE/.." && pwd)/.venvs"
PY="${MILLIS_PEER_PYTHON:-python3}"
# torch must come first and be pinned: 2.13.0 is a CPU wheel on local disk;
# any other version would pull multi-GB CUDA wheels.
TORCH="torch==2.13.0"
mkdir -p "$VENVS"

# name | "torch" to install torch first, "-" not | packages (pinned to the versions the
# benchmark was checked with; bump deliberately) | import check
peer_spec() {
  case "$1" in
    optimum)  echo "torch|optimum-onnx==0.1.0 onnxruntime==1.32.0|import optimum.onnxruntime, onnxruntime, transformers; from optimum.onnxruntime import ORTOptimizer, ORTQuantizer, ORTModelForFeatureExtraction; from optimum.onnxruntime.configuration import AutoQuantizationConfig, AutoOptimizationConfig";;
    openvino) echo "torch|openvino==2026.4.1 nncf==3.4.0 transformers==5.23.0|import openvino, nncf, transformers, torch";;
    ct2)      echo "torch|ctranslate2==4.8.5 transformers==5.23.0|import ctranslate2, transformers, torch; from ctranslate2.converters import TransformersConverter";;
    # fastembed runs ONNX Runtime on an ONNX file; optimum-onnx exports the local HF model dir to
    # it (the way fastembed's own hub models are exported), so nothing comes from a model hub
    fastembed) echo "torch|fastembed==0.9.1 onnxruntime==1.32.0 optimum-onnx==0.1.0|import fastembed, onnxruntime; from fastembed import TextEmbedding; from fastembed.common.model_description import PoolingType, ModelSource; from optimum.exporters.onnx import main_export";;
    # the embedding server of bench/serve_vs_infinity.py (its pins, numpy<2 and
    # sentence-transformers<4, conflict with millis's: hence its own venv)
    infinity) echo "torch|infinity-emb[server,torch,optimum]==0.0.78|import infinity_emb, sentence_transformers, optimum.onnxruntime; from infinity_emb.infinity_server import create_server";;
    # llama.cpp (the generation peer): llama-cpp-python builds its vendored llama.cpp from
    # the sdist (no wheels on PyPI); CMAKE_ARGS below records the build flags. [server] adds
    # its OpenAI-compatible server. gguf writes the F32 / requantized files the bench compares.
    llamacpp) echo "-|llama-cpp-python[server]==0.3.36 gguf==0.19.0 numpy|import llama_cpp, gguf; llama_cpp.llama_model_quantize_default_params()";;
    *) return 1;;
  esac
}

# llama.cpp's build flags: native ISA (what its users get from a source build), no examples/tests/tools (they
# only cost build time on 2 cores). On a CPU with AMX, llama.cpp's AMX backend segfaults in its first matmul of
# a quantized model (Sapphire Rapids, 2026-12-02: Q4_1, Q8_0, Q4_K_M, Q4_0 all exit with SIGSEGV; upstream
# ggml-org/llama.cpp#20824, which dspy's CI answered by dropping that build variant): there the native ISA
# less AMX, spelled out (GGML_NATIVE would turn AMX on with -march=native).
llamacpp_cmake_args() {
  local rest="-DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF"
  if [[ -n "${MILLIS_LLAMACPP_CMAKE_ARGS:-}" ]]; then echo "$MILLIS_LLAMACPP_CMAKE_ARGS"
  elif grep -qw amx_int8 /proc/cpuinfo 2>/dev/null; then
    local isa="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON"
    isa="$isa -DGGML_AVX_VNNI=ON -DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON"
    echo "$isa -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF $rest"
  else echo "-DGGML_NATIVE=ON $rest"; fi
}

setup_one() {
  local name="$1" spec torch pkgs check dir stamp
  spec="$(peer_spec "$name")" || { echo "unknown peer $name" >&2; return 1; }
  IFS='|' read -r torch pkgs check <<<"$spec"
  dir="$VENVS/$name"
  stamp="$torch $pkgs"
  # llama.cpp is built from source: its flags are part of what was installed (and pip's wheel cache would
  # hand back a wheel built with other flags)
  [[ "$name" == llamacpp ]] && stamp="$stamp $(llamacpp_cmake_args)" && export PIP_NO_CACHE_DIR=1
  if [[ -f "$dir/.millis-ok" && "$(cat "$dir/.millis-ok")" == "$stamp" ]]; then
    echo "[$name] up to date"; return 0
  fi
  rm -f "$dir/.millis-ok" "$dir/.millis-fail"
  local t0=$SECONDS log="$VENVS/$name.log"
  echo "[$name] creating venv (log: $log)"
  (  # subshell: the first failing step exits it non-zero (explicit: set -e is void under `||`)
    [[ -x "$dir/bin/python" ]] || "$PY" -m venv "$dir" || exit 1
    "$dir/bin/python" -m pip install -q --upgrade pip wheel || exit 1
    export CMAKE_ARGS="$(llamacpp_cmake_args)"
    # a llama.cpp built with other flags would count as installed: remove it first
    [[ "$name" == llamacpp ]] && { "$dir/bin/python" -m pip uninstall -q -y llama-cpp-python || true; }
    if [[ "$torch" == torch ]]; then
      "$dir/bin/python" -m pip install "$TORCH" || exit 1
      # torch stays pinned while the rest resolves
      # shellcheck disable=SC2086
      "$dir/bin/python" -m pip install $pkgs "$TORCH" || exit 1
    else
      # shellcheck disable=SC2086
      "$dir/bin/python" -m pip install $pkgs || exit 1
    fi
  ) >"$log" 2>&1
  local rc=$?
  if [[ $rc -ne 0 ]]; then
    mkdir -p "$dir"
    echo "pip install failed (see $log): $(tail -n 3 "$log" | tr '\n' ' ')" >"$dir/.millis-fail"
    echo "[$name] FAILED: $(cat "$dir/.millis-fail")"; return 1
  fi
  if ! err="$("$dir/bin/python" -c "$check" 2>&1)"; then
    echo "import check failed: $(echo "$err" | tail -n 1)" >"$dir/.millis-fail"
    echo "[$name] FAILED: $(cat "$dir/.millis-fail")"; return 1
  fi
  echo "$stamp" >"$dir/.millis-ok"
  [[ "$name" == llamacpp ]] && llamacpp_cmake_args >"$dir/.millis-cmake-args"  # bench/gguf_report.py records it
  "$dir/bin/python" -m pip freeze >"$dir/.millis-freeze" 2>/dev/null
  echo "[$name] ok in $((SECONDS - t0)) s"
}

names=("$@"); [[ ${#names[@]} -eq 0 ]] && names=(optimum openvino ct2 fastembed)
status=0
for n in "${names[@]}"; do setup_one "$n" || status=1; done
exit $status
