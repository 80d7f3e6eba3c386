#!/usr/bin/env bash
# The device run for issue 20, in two stages, one a run call (the call's limit and the 64 MiB carry: SmolLM2's
# GGUF travels in two halves, one a call, joined on the machine for stage 2 if it stayed warm since stage 1):
#   bash bench/gpu_run.sh 1 SECONDS   the Llama-1B shape: weights, decode against HF, weight-only formats,
#                                     then the GPU tests (with py, tok, texts.txt and part-aa)
#   bash bench/gpu_run.sh 2 SECONDS   SmolLM2, encoders, serve, then Triton tests, optimize, HF +
#                                     torch.compile last (with py, tok, texts.txt and part-ab)
# Stage 2 needs nothing else from stage 1 but what a fresh machine cannot have: SmolLM2 needs stage 1's part-aa
# (without it the part is skipped, said in the log), and the Llama-1B weights stage 1 built (bench/.cache,
# git-ignored: without them they are built here first where the time left holds that and the compile part).
# Measurements first, tests after (the benches check their tokens and vectors against HF themselves): with 15
# minutes of device time for both calls the boxes sum to more than the calls hold, and the last parts go.
# Each part is time-boxed so that one hang costs its part alone, and no box runs past SECONDS from the start
# (the call's timeout less a margin): a part with too little time left is skipped, the last parts first.
# Results and a log under $OUT. Prepare the carry first (bench/gpu_prepare.sh, whose header gives the calls).
set -u
STAGE=${1:-all}
SECONDS_ASKED=${2:-585}
[ "$SECONDS_ASKED" -gt 585 ] && SECONDS_ASKED=585  # a run call holds 600 s: its timeout_s is this + 15
END=$(( $(date +%s) + SECONDS_ASKED ))
OUT=${OUT:-/tmp/millis-gpu-out}
C=bench/.gpu_carry
mkdir -p "$OUT"
export PYTHONPATH=".:$C/py" PYTHONUNBUFFERED=1
TAG=$([ "$STAGE" = all ] && echo all || echo "stage$STAGE")  # each stage's log and environment its own
LOG="$OUT/gpu_run_$TAG.log"
left() { echo $(( END - $(date +%s) - 15 )); }  # seconds a box may take: its 10 s kill grace and a margin off
part() {  # part SECONDS NAME CMD...: one time-boxed step, its exit status logged
    local t=$1 name=$2 left; shift 2
    left=$(left)
    if [ "$left" -lt 20 ]; then echo "== $name: skipped, ${left} s left" | tee -a "$LOG"; return; fi
    [ "$left" -lt "$t" ] && t=$left
    echo "== $(date +%T) $name (box ${t} s): $*" | tee -a "$LOG"
    timeout -k 10 "$t" "$@" >> "$LOG" 2>&1
    local rc=$?  # before any command substitution resets $?
    echo "== $(date +%T) $name: rc=$rc" | tee -a "$LOG"
    tail -n 25 "$LOG" | grep -v '^==' || true
}
stage() { [ "$STAGE" = all ] || [ "$STAGE" = "$1" ]; }
python3 - > "$OUT/env_$TAG.json" <<'PYEOF'
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
cat "$OUT/env_$TAG.json"
# results files name the card ("h200", "h100": bench/gpu_probes.py gpu_slug), whichever was lent
SLUG=$(python3 -c "import sys; sys.path.insert(0, 'bench'); import torch; from gpu_probes import gpu_slug
print(gpu_slug(torch.cuda.get_device_name()) if torch.cuda.is_available() else 'nogpu')" 2>/dev/null || echo gpu)
T="python3 -m pytest -q --maxfail=3 -rfE --tb=short -p no:cacheprovider"
WEIGHTS=bench/.cache/llama-1b-random/config.json  # bench/peers/models.py decoder_dir's, written last
llama1b_weights() {  # the Llama-3.2-1B-shaped random weights, initialised on the GPU (its CPU needs a minute or more)
    part 60 llama1b-weights python3 -c "import sys, torch; sys.path.insert(0, 'bench/peers'); torch.set_default_device(
'cuda'); import models; print(models.decoder_dir('llama-1b'))"
}
if stage 1; then
    # 0. the Llama-1B-shaped weights (60 s)
    llama1b_weights
    # 1. Llama-3.2-1B shape: millis bf16 against HF eager, alternated (the first H200 run: 41 s) (100 s)
    part 100 llama1b python3 bench/generation.py --device cuda --systems millis:bf16,hf:bf16 --rounds 2 --reps 1 \
        --batches 1,32 --new-tokens 32 --new-tokens-batched 16 --ttft-prompts 512 --bandwidth-mib 0 --pause 0.05 \
        --out "$OUT/generation_$SLUG.json"
    # 2. the Llama-1B shape weight-only: bf16 / int8 / int4 / fp8 decode, each matmul against cuBLAS (the second
    #    H200 run: 60 s; each format now also compiles and tunes the layer kernel) (130 s)
    part 130 weight-only python3 bench/gpu_weight_only.py --out "$OUT"
    # 3. the GPU tests, last (the benches above check their own tokens against HF): CUDA graphs against eager and
    #    HF, Triton kernels against torch, the batch-1 layer kernel's grid barriers (a 1B-width model's compiles and
    #    tuning); the CUDA runtime's token states (/embed_all) and SPLADE head on tiny models (150 s; what the call's
    #    time leaves)
    part 150 gpu-tests $T -m gpu tests/test_decode_layer.py tests/test_gen_engine.py tests/test_gpu.py \
        tests/test_embed_all.py tests/test_splade.py
fi
if stage 2; then
    # SmolLM2's GGUF: stage 1's part-aa (on this machine only if it stayed warm since stage 1) and this call's part-ab
    if [ ! -f "$C/smollm2.gguf" ]; then
        if [ ! -f "$C/smollm2.gguf.part-aa" ]; then
            echo "== smollm2: skipped, stage 1's part-aa is not on this machine (a fresh machine since stage 1)" \
                | tee -a "$LOG"
        elif [ ! -f "$C/smollm2.gguf.part-ab" ]; then
            echo "== smollm2: skipped, part-ab was not carried" | tee -a "$LOG"
        else
            cat "$C/smollm2.gguf.part-aa" "$C/smollm2.gguf.part-ab" > "$C/smollm2.gguf"
            SUM=$(sha256sum "$C/smollm2.gguf" | cut -d' ' -f1)
            [ "$SUM" = "$(cat "$C/tok/smollm2.gguf.sha256" 2>/dev/null)" ] \
                || { echo "== smollm2: skipped, the joined GGUF's checksum does not match (part-aa of another" \
                          "prepare?)" | tee -a "$LOG"; rm -f "$C/smollm2.gguf"; }
        fi
    fi
    # 4. SmolLM2-135M-Instruct from its GGUF: b1 ms/token, kernels per step, greedy vs CPU fp32 (GPU bf16 and
    #    fp32), HTTP ITL (120 s)
    if [ -f "$C/smollm2.gguf" ]; then
        part 120 smollm2 python3 bench/gpu_decode.py --gguf "$C/smollm2.gguf" --out "$OUT"
    fi
    # 5. encoders: MiniLM and BERT-base, millis fp16 / fp16 dense / W8A8 int8 graphs against HF eager and
    #    torch.compile (9 systems took over 100 s on the first H200 run: the slower ones left out; the second
    #    ran out of its 120 s box at MiniLM after the cold starts, 6.0 s and 5.6 s: now left out) (130 s)
    part 130 encoders python3 bench/gpu_encoders.py --seconds 0.5 --rounds 3 --no-probes --no-cold-start --out "$OUT" --systems \
        hf-eager-fp16,hf-compile-fp16,millis-fp16,millis-fp16-dense,millis-int8
    # 6. millis serve --device cuda, BERT-base classifier over HTTP (70 s)
    part 70 serve python3 bench/gpu_serve.py --tokenizer "$C/tok" --texts "$C/texts.txt" --duration 3 --out "$OUT"
    # 7. the weight-only and fused decode kernels, the one-pass dequantize and the encoder's W8A8 GEMM against
    #    their torch paths (about 60 Triton compiles) (80 s)
    # w8a8 first: the fused-decode tests compile the layer kernel many times (run 2: 65 s of the box)
    part 80 triton-tests $T -m gpu tests/test_w8a8.py tests/test_weight_only.py tests/test_fused_decode.py
    # 8. optimize --device cuda: the GPU variants built, checked against HF fp32, judged, measured, written and
    #    loaded back (tiny BERT; CI runs these through a CPU stand-in) (50 s)
    part 50 optimize-cuda $T tests/test_optimize_gpu.py tests/test_variants.py \
        -k "(gpu_artifact or gpu_variants or cuda) and not refused_on_cuda"
    # 9. the Llama-1B shape against HF static cache + torch.compile (its compile ran past 160 s on the first
    #    H200 run: last, so that it costs nothing else) (200 s), on stage 1's weights: on a fresh machine they are
    #    built first (60 s) where the time left also holds the compile (160 s), else the part is skipped
    if [ ! -f "$WEIGHTS" ] && [ "$(left)" -ge 220 ]; then
        echo "== llama1b-weights: not on this machine (stage 1's; a fresh machine since): built here" | tee -a "$LOG"
        llama1b_weights
    fi
    if [ -f "$WEIGHTS" ]; then
        part 200 llama1b-compile python3 bench/generation.py --device cuda --systems millis:bf16,hf:static-compile \
            --rounds 1 --reps 1 --batches 1 --new-tokens 32 --ttft-prompts 512 --bandwidth-mib 0 --pause 0.05 \
            --out "$OUT/generation_compile_$SLUG.json"
    else
        echo "== llama1b-compile: skipped, no Llama-1B weights on this machine (stage 1's; a fresh machine since)" \
             "and $(left) s left" | tee -a "$LOG"
    fi
fi
ls -la "$OUT"
