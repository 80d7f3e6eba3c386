#!/usr/bin/env bash
# The one device run for issue 20: every GPU figure in under 10 minutes, each part time-boxed so that one
# hang costs its part alone; results and a log under $OUT. Prepare the carry first (bench/gpu_prepare.sh,
# whose header gives the two run calls). Order: what the issue's targets need most comes first. The boxes
# sum to 790 s, over the call's 600: parts usually end early, and a long run loses the last ones first.
set -u
OUT=${OUT:-/tmp/millis-gpu-out}
C=bench/.gpu_carry
mkdir -p "$OUT"
export PYTHONPATH=".:$C/py" PYTHONUNBUFFERED=1
LOG="$OUT/gpu_run.log"
part() {  # part SECONDS NAME CMD...: one time-boxed step, its exit status logged
    local t=$1 name=$2; shift 2
    echo "== $(date +%T) $name: $*" | tee -a "$LOG"
    timeout -k 10 "$t" "$@" >> "$LOG" 2>&1
    echo "== $(date +%T) $name: rc=$?" | tee -a "$LOG"
    tail -n 25 "$LOG" | grep -v '^==' || true
}
python3 - > "$OUT/env.json" <<'PYEOF'
import json, platform, subprocess, torch
info = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
for mod in ("transformers", "triton", "pytest", "gguf"):
    try:
        info[mod] = __import__(mod).__version__
    except Exception as e:  # noqa: BLE001
        info[mod] = f"missing ({type(e).__name__})"
smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                      "--format=csv,noheader"], capture_output=True, text=True)
info["nvidia_smi"] = smi.stdout.strip()
print(json.dumps(info, indent=1))
PYEOF
cat "$OUT/env.json"
if [ ! -f "$C/smollm2.gguf" ] && [ -f "$C/smollm2.gguf.part-aa" ] && [ -f "$C/smollm2.gguf.part-ab" ]; then
    cat "$C/smollm2.gguf.part-aa" "$C/smollm2.gguf.part-ab" > "$C/smollm2.gguf"
    [ "$(sha256sum "$C/smollm2.gguf" | cut -d' ' -f1)" = "$(cat "$C/tok/smollm2.gguf.sha256")" ] \
        || { echo "smollm2.gguf: checksum mismatch" | tee -a "$LOG"; rm -f "$C/smollm2.gguf"; }
fi
# 0. the Llama-3.2-1B-shaped random weights, initialised on the GPU (on its CPU: a minute or more) (60 s)
part 60 llama1b-weights python3 -c "import sys, torch; sys.path.insert(0, 'bench/peers'); torch.set_default_device(
'cuda'); import models; print(models.decoder_dir('llama-1b'))"
# 1. the GPU tests: CUDA graphs against eager and HF, Triton kernels against torch (60 s); the weight-only
#    and fused decode kernels and the encoder's W8A8 GEMM against their torch paths (80 s: about 60 Triton
#    compiles)
if python3 -c "import pytest" 2>/dev/null; then
    part 60 gpu-tests python3 -m pytest -q -x -m gpu -p no:cacheprovider tests/test_gpu.py tests/test_gen_engine.py
    part 80 triton-tests python3 -m pytest -q -x -m gpu -p no:cacheprovider tests/test_weight_only.py \
        tests/test_fused_decode.py tests/test_w8a8.py
fi
# 2. Llama-3.2-1B shape: millis bf16 against HF eager and HF static cache + torch.compile, alternated (160 s)
part 160 llama1b python3 bench/generation.py --device cuda --rounds 2 --reps 1 --batches 1,32 --new-tokens 32 \
    --new-tokens-batched 16 --ttft-prompts 512 --bandwidth-mib 0 --pause 0.05 --out "$OUT/generation_h200.json"
# 3. SmolLM2-135M-Instruct from its GGUF: b1 ms/token, kernels per step, greedy vs CPU fp32, HTTP ITL (110 s)
if [ -f "$C/smollm2.gguf" ]; then
    part 110 smollm2 python3 bench/gpu_decode.py --gguf "$C/smollm2.gguf" --out "$OUT"
fi
# 3b. the Llama-1B shape weight-only: bf16 / int8 / int4 / fp8 decode, and each matmul against cuBLAS (100 s)
part 100 weight-only python3 bench/gpu_weight_only.py --out "$OUT"
# 4. encoders: MiniLM and BERT-base, millis fp16 / bf16 / W8A8 int8 and fp8 graphs against HF eager / compile /
#    whole graph (the research layers measured no better on the H100: left out) (100 s)
part 100 encoders python3 bench/gpu_encoders.py --seconds 0.5 --rounds 3 --no-probes --out "$OUT" --systems \
    hf-eager-fp32,hf-eager-fp16,hf-compile-fp16,hf-graph-fp16,millis-fp16,millis-bf16,millis-fp16-dense,millis-int8,millis-fp8
# 5. millis serve --device cuda, BERT-base classifier over HTTP (70 s)
if [ -d "$C/tok" ] && [ -f "$C/texts.txt" ]; then
    part 70 serve python3 bench/gpu_serve.py --tokenizer "$C/tok" --texts "$C/texts.txt" --duration 3 --out "$OUT"
fi
# 6. optimize --device cuda: the GPU variants built and checked against HF fp32, judged, measured, written as
#    an artifact and loaded back (tiny BERT; the tests run on CUDA for real where CI runs a CPU stand-in) (50 s)
if python3 -c "import pytest" 2>/dev/null; then
    part 50 optimize-cuda python3 -m pytest -q -x -p no:cacheprovider tests/test_optimize_gpu.py tests/test_variants.py \
        -k "(gpu_artifact or gpu_variants or cuda) and not refused_on_cuda"
fi
ls -la "$OUT"
