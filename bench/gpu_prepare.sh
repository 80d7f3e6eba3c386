#!/usr/bin/env bash
# Prepares bench/.gpu_carry/ (git-ignored) for the one device run, bench/gpu_run.sh: what the lent GPU
# machine cannot download. A run call carries at most 64 MiB, and SmolLM2's Q4_1 GGUF is 98 MB, so the
# file goes in two halves over two calls on the warm machine (joined there), one stage of the run each:
#   run(carry=[bench/.gpu_carry/py, bench/.gpu_carry/tok, bench/.gpu_carry/texts.txt,
#              bench/.gpu_carry/smollm2.gguf.part-aa], command="bash bench/gpu_run.sh 1 400", timeout_s=415)
#   run(carry=[bench/.gpu_carry/smollm2.gguf.part-ab], command="bash bench/gpu_run.sh 2 S", timeout_s=S+15)
# with S from the device time left (status), the second call at once (the machine stays warm 30 s); the first
# call's carried paths stay on the machine: the second names only its own.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
C=bench/.gpu_carry
rm -rf "$C"
mkdir -p "$C/py" "$C/tok"
# gguf (pure Python, 1.4 MB): dequantizes the GGUF's tensors for the torch model on the GPU
cp -r "$($PY -c 'import gguf, os; print(os.path.dirname(gguf.__file__))')" "$C/py/"
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
echo "bench/.gpu_carry ready; see this script's header for the two run calls"
