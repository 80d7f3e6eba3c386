#!/usr/bin/env bash
# Prepares bench/.gpu_carry/ (git-ignored) for the one device run, bench/gpu_run.sh: what the lent GPU
# machine cannot download. A run call carries at most 64 MiB (the repo's tracked files and its untracked files
# git does not ignore travel with every call), and SmolLM2's Q4_1 GGUF is 98 MB, so the file goes in two halves
# over two calls (joined on the machine for stage 2 if it stayed warm since stage 1), one stage of the run each;
# both calls carry the rest, so that stage 2 on a fresh machine runs all but SmolLM2 (and builds the Llama-1B
# weights itself where its time allows):
#   run(carry=[bench/.gpu_carry/py, bench/.gpu_carry/tok, bench/.gpu_carry/texts.txt,
#              bench/.gpu_carry/smollm2.gguf.part-aa], command="bash bench/gpu_run.sh 1 400", timeout_s=415)
#   run(carry=[bench/.gpu_carry/py, bench/.gpu_carry/tok, bench/.gpu_carry/texts.txt,
#              bench/.gpu_carry/smollm2.gguf.part-ab], command="bash bench/gpu_run.sh 2 S", timeout_s=S+15)
# with S from the device time left (status), the second call at once (the machine stays warm 30 s). The last
# lines of this script give each call's size against the 64 MiB (and fail past it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
C=bench/.gpu_carry
rm -rf "$C"
mkdir -p "$C/py" "$C/tok"
# gguf (pure Python, 1.4 MB): dequantizes the GGUF's tensors for the torch model on the GPU
cp -r "$($PY -c 'import gguf, os; print(os.path.dirname(gguf.__file__))')" "$C/py/"
find "$C/py" -name __pycache__ -type d -prune -exec rm -rf {} +  # this Python's bytecode (0.7 MB): not the device's
# (pytest and pytest-timeout are in the device image: KINDS.md's package list)
# the HTTP server's packages the device's image lacks (starlette, uvicorn, orjson, httptools: 0.9 MB), as
# wheels for its Python 3.12, unpacked onto the same path (its anyio, h11 and click serve their needs)
WHL=$(mktemp -d)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$WHL" \
    starlette==1.10.0 uvicorn==0.54.0 orjson==3.13.0 httptools==0.9.0
for w in "$WHL"/*.whl; do $PY -m zipfile -e "$w" "$C/py/"; done
rm -rf "$WHL"
# a BERT WordPiece tokenizer (MiniLM's, bert-base-uncased's vocabulary) for the random-weight BERT-base
MINILM=$($PY -c 'from millis.encoder.source import builtin_minilm_dir; print(builtin_minilm_dir())')
for f in vocab.txt tokenizer.json tokenizer_config.json special_tokens_map.json; do
    [ -f "$MINILM/$f" ] && cp "$MINILM/$f" "$C/tok/"
done
# request texts: Banking77's test split (MILLIS_DATA, else ../shared/data), one per line
$PY - > "$C/texts.txt" <<'PYEOF'
import csv, os, pathlib
root = pathlib.Path(os.environ.get("MILLIS_DATA", "../shared/data"))
with open(root / "banking77" / "test.csv", newline="") as f:
    for row in csv.DictReader(f):
        print(row["text"].replace("\n", " "))
PYEOF
GGUF=$($PY -c 'from millis.gen.builtin import resolve_model; print(resolve_model("builtin:smollm2"))')
split -n 2 -d -a 2 "$GGUF" "$C/smollm2.gguf.part-" 2>/dev/null || split -n 2 "$GGUF" "$C/smollm2.gguf.part-"
ls "$C"/smollm2.gguf.part-* | head -2 | {
    read -r a; read -r b
    mv "$a" "$C/smollm2.gguf.part-aa"; mv "$b" "$C/smollm2.gguf.part-ab"
}
sha256sum "$GGUF" | cut -d' ' -f1 > "$C/smollm2.gguf.sha256"
cp "$C/smollm2.gguf.sha256" "$C/tok/"  # travels with the first call
du -sh "$C"/* | sed 's/^/  /'
# each call's size: the repo's files that travel with every call (tracked, and untracked but not ignored), the
# paths both calls carry, and its half of the GGUF
REPO=$( { git ls-files -z; git ls-files -z --others --exclude-standard; } \
    | { xargs -0 -r stat -c %s 2>/dev/null || true; } | awk '{s += $1} END {print s + 0}')
BOTH=$(du -sb "$C/py" "$C/tok" "$C/texts.txt" | awk '{s += $1} END {print s + 0}')
for half in aa ab; do
    n=$(( REPO + BOTH + $(stat -c %s "$C/smollm2.gguf.part-$half") ))
    awk -v n="$n" -v r="$REPO" -v b="$BOTH" -v h="$half" 'BEGIN {printf "  call with part-%s: %d bytes, %.2f MiB " \
        "(repo %.2f, py + tok + texts.txt %.2f, the half %.2f) of 64 MiB\n", h, n, n / 1048576, r / 1048576, \
        b / 1048576, (n - r - b) / 1048576}'
    [ "$n" -lt $(( 64 * 1024 * 1024 )) ] || { echo "the call with part-$half carries more than 64 MiB" >&2; exit 1; }
done
echo "bench/.gpu_carry ready; see this script's header for the two run calls"
