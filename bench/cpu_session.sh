#!/usr/bin/env bash
# Issue 18's whole measurement on the CPU this machine has, in one command: the peers' venvs, the multiply-add
# ceiling, every encoder model against every peer, and the targets cell by cell.
#
#   bash bench/cpu_session.sh TAG          # e.g. zen3, spr, zen4_s17: files bench/results/*_TAG.json
#
# Writes bench/results/cpu_ceiling_TAG.json, cpu_encoders_TAG.json and encoder_targets_TAG.md (the targets table
# with the CPU and ISA the run recorded). About 45 minutes on 2 cores (4 for the venvs, ~12 a model); run nothing
# else meanwhile: every figure is a timing. MODELS / SYSTEMS in the environment override the defaults.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
TAG="${1:?usage: bash bench/cpu_session.sh TAG}"
case "$TAG" in *[!A-Za-z0-9_]*) echo "TAG: letters, digits and _ only" >&2; exit 2;; esac
MODELS="${MODELS:-minilm,bge-small,bert-base}"
SYSTEMS="${SYSTEMS:-torch_eager,optimum_o3_int8,openvino_default,openvino_nncf_int8,ct2_int8,fastembed,millis:native-int8,millis:native-int7-row-att8,millis:native-int8-row,millis:native-int8-row-att8}"
PY=.venv/bin/python
[ -x "$PY" ] || make install
grep -m1 "model name" /proc/cpuinfo
grep -m1 flags /proc/cpuinfo | tr ' ' '\n' | grep -E '^(avx2|fma|f16c|avx512[a-z_0-9]*|amx[a-z_0-9]*|avx_vnni)$' | tr '\n' ' '; echo
bash bench/peers/setup.sh optimum openvino ct2 fastembed
ENC=bench/results/cpu_encoders_$TAG.json
RC=0  # a model that failed (cpu_encoders.py exits 1) still lets the others' ceiling and targets be written
"$PY" bench/cpu_encoders.py --models "$MODELS" --systems "$SYSTEMS" --out "$ENC" || RC=$?
"$PY" bench/cpu_ceiling.py --peers "$ENC" --out "bench/results/cpu_ceiling_$TAG.json"
"$PY" bench/encoder_targets.py --markdown "$ENC" | tee "bench/results/encoder_targets_$TAG.md"
exit "$RC"
