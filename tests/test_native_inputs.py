"""The native encoder checks what its C reads unchecked: the weights' shapes against config.json at load
(millis.encoder.bert_weights.check_shapes) and the flat-token calls' arrays (hidden_states, head_of). Each of
these used to read past an array: the crash cases run in a subprocess, so a crash is a failed test."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from millis.common.errors import MillisError
from millis.encoder.bert_weights import EMBEDDINGS, HEAD, BertArrays, EncoderConfig, layer_parts
from millis.encoder.source import Pooling
from millis.kernels.native import native_isa

ROOT = Path(__file__).resolve().parents[1]


def run_cases(code: str, *args: str) -> dict[str, str]:
    """Runs `code` (which prints `case: outcome` lines) in a fresh interpreter; its outcomes by case."""
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=str(ROOT), timeout=300)
    assert r.returncode == 0, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])  # -11: read past an array
    return dict(line.split(": ", 1) for line in r.stdout.splitlines() if ": " in line)


def tiny_state(tiny_dirs):
    from safetensors.numpy import load_file

    d = tiny_dirs["bert"]
    return EncoderConfig.from_hf(json.loads((d / "config.json").read_text())), load_file(str(d / "model.safetensors"))


def test_every_weight_shape_is_checked_at_load(tiny_dirs):
    """Each tensor one column (or value) short (the embeddings, every part of a layer, the classifier head) is a
    MillisError that names it and both shapes; so is a position table with fewer rows than the config's
    positions, while a longer one is fine (positions are checked against the config's)."""
    cfg, state = tiny_state(tiny_dirs)
    prefix = "bert." if any(k.startswith("bert.") for k in state) else ""
    names = [n for part in (*EMBEDDINGS.values(), *layer_parts(1).values(), *HEAD.values()) for n in part]
    for name in names:
        key = name if name in state else prefix + name
        says = f"weights' .*{re.escape(name)}.* (is .*, but config.json needs|do not stack)"
        with pytest.raises(MillisError, match=says):
            BertArrays(cfg, dict(state, **{key: state[key][..., :-1]}), "classify", Pooling())
    pos = prefix + EMBEDDINGS["pos"][0]
    with pytest.raises(MillisError, match=r"position_embeddings.weight is \(129, 32\), but config.json needs at "
                                          r"least \(130, 32\)"):
        BertArrays(cfg, dict(state, **{pos: state[pos][:-1]}), "classify", Pooling())
    longer = np.concatenate([state[pos], state[pos][:5]])
    assert BertArrays(cfg, dict(state, **{pos: longer}), "classify", Pooling()).pos.shape[0] == cfg.max_positions + 5


CONFIG_CODE = """
import dataclasses, json, shutil, sys
from pathlib import Path
import numpy as np
from millis.common.errors import MillisError
from millis.encoder.bert_weights import load_arrays
from millis.encoder.native import NativeBert
from millis.encoder.source import Pooling

src, d = Path(sys.argv[1]), Path(sys.argv[2])
shutil.copytree(src, d)
cfg = json.loads((d / "config.json").read_text())
cfg["vocab_size"] = 10 ** 6  # the word table keeps its rows
(d / "config.json").write_text(json.dumps(cfg))
pooling = Pooling("mean", normalize=True)

def case(name, make):
    try:
        model = make()
        ids = np.array([[2, 10 ** 6 - 1]])
        print(f"{name}: ran {model(ids, np.ones_like(ids)).shape}", flush=True)
    except MillisError as e:
        print(f"{name}: MillisError {e}", flush=True)

case("load", lambda: NativeBert(load_arrays(d, "embed", pooling), "fp32", 1))
arrays = load_arrays(src, "embed", pooling)
arrays.cfg = dataclasses.replace(arrays.cfg, vocab=10 ** 6)
case("native", lambda: NativeBert(arrays, "fp32", 1))  # NativeBert checks an encoder it did not load
good = load_arrays(src, "embed", pooling)
good.layers[1] = good.layers[1]._replace(w2=good.layers[1].w2[:, :32])
case("layer", lambda: NativeBert(good, "int8", 1))
"""


def test_a_config_larger_than_its_weights_is_an_error_not_a_crash(tiny_dirs, tmp_path):
    """config.json's vocab_size 10^6 over a 462-row word table: bert_forward.c checked ids against the config and
    read row 999,999 of the table (a segfault); now its load says which tensor disagrees. NativeBert checks an
    encoder it did not load itself too (a millis.gpu.Encoder), and every layer's matrices."""
    if native_isa() is None:
        pytest.skip("native kernels are off (MILLIS_NO_KERNELS)")
    out = run_cases(CONFIG_CODE, str(tiny_dirs["bert"]), str(tmp_path / "m"))
    for case in ("load", "native"):
        assert out[case].startswith("MillisError the weights' embeddings.word_embeddings.weight is (462, 32), but "
                                    "config.json needs (1000000, 32)"), out
    assert out["layer"].startswith("MillisError the weights' encoder.layer.1.output.dense.weight is (32, 32), "
                                   "but config.json needs (32, 64)"), out


CALLS_CODE = """
import sys
import numpy as np
from millis.common.errors import MillisError
from millis.encoder.bert_weights import load_arrays
from millis.encoder.native import NativeBert
from millis.encoder.source import Pooling

model = NativeBert(load_arrays(__import__("pathlib").Path(sys.argv[1]), "embed", Pooling("mean")), "fp32", 1)
ids, pos, types = np.array([2, 7, 9, 11]), np.arange(4), np.zeros(4, np.int64)
start = np.array([0, 3, 4])
h = model.hidden_states(ids, pos, types, start)
want = model.head_of(h, start, np.array([3, 1]), pos)

def case(name, call):
    try:
        print(f"{name}: ran {np.asarray(call()).tolist()}", flush=True)
    except MillisError as e:
        print(f"{name}: MillisError {e}", flush=True)

case("empty start", lambda: model.hidden_states(ids, pos, types, start[:0]))
case("start past n", lambda: model.hidden_states(ids, pos, types, np.array([0, 3, 1 << 20])))
case("falling start", lambda: model.hidden_states(ids, pos, types, np.array([0, 5, 4])))
case("short pos", lambda: model.hidden_states(ids, pos[:1], types, start))
case("short types", lambda: model.hidden_states(ids, pos, types[:2], start))
case("wrapping id", lambda: model.hidden_states(ids + (1 << 32), pos, types, start))
case("head start past h", lambda: model.head_of(h, np.array([0, 3, 1 << 24]), np.array([3, 1 << 24]), pos))
case("head short start", lambda: model.head_of(h, start[:1], np.array([3, 1]), pos))
case("head float64", lambda: np.array_equal(model.head_of(h.astype(np.float64), start, np.array([3, 1]), pos), want))
case("head F order", lambda: np.array_equal(model.head_of(np.asfortranarray(h), start, np.array([3, 1]), pos), want))
"""


def test_flat_token_calls_check_their_arrays(tiny_dirs):
    """hidden_states and head_of take flat tokens and offsets and hand them to C: an empty `start` (C read
    start[-1]), offsets past the tokens, positions or types shorter than the ids, an id that the int32 cast would
    wrap into range, or offsets past head_of's rows are MillisErrors; head_of takes any float array (it read a
    float64 or column-major array's bytes as float32 rows)."""
    if native_isa() is None:
        pytest.skip("native kernels are off (MILLIS_NO_KERNELS)")
    out = run_cases(CALLS_CODE, str(tiny_dirs["bert"]))
    for case in ("empty start", "start past n", "falling start", "head start past h", "head short start"):
        assert out[case].startswith("MillisError") and ("offsets" in out[case]), (case, out[case])
    for case in ("short pos", "short types"):
        assert out[case].startswith("MillisError ids, positions and token types must be 1-D"), (case, out[case])
    assert out["wrapping id"].startswith("MillisError a token id, position or token type is out of range"), out
    assert out["head float64"] == out["head F order"] == "ran True", out


def test_the_attention_mask_is_0_or_1(tiny_dirs):
    """A mask of 0.5 was cast to 0 (every token dropped: a zero vector), 2 and -1 counted as 1; HF's runtimes read
    such masks otherwise. Only 0 / 1 integers or booleans are taken."""
    if native_isa() is None:
        pytest.skip("native kernels are off (MILLIS_NO_KERNELS)")
    from millis.encoder.native import NativeBert

    cfg, state = tiny_state(tiny_dirs)
    m = NativeBert(BertArrays(cfg, state, "embed", Pooling()), "fp32", 1)
    ids = np.array([[2, 5, 6, 3]])
    ref = m(ids, np.ones((1, 4), np.int64))
    assert np.array_equal(m(ids, np.ones((1, 4), bool)), ref)
    for bad in (np.full((1, 4), 0.5), np.array([[1, 1, 2, 1]]), np.array([[1, -1, 1, 1]])):
        with pytest.raises(MillisError, match="the mask 0 / 1"):
            m(ids, bad)


def test_the_avx512_build_compiles_below_O3():
    """i8_attend.h's lane shuffle took a loop counter as its immediate: a constant only once -O3 had unrolled the
    loop, so debug and sanitizer builds (-O0 / -O1) of the avx512 kernels did not compile."""
    import shutil

    from millis.kernels.native import ISA_FLAGS

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    src = ROOT / "millis" / "kernels" / "amx.c"
    r = subprocess.run([cc, "-O1", "-std=gnu11", "-c", "-o", os.devnull, *ISA_FLAGS["avx512"], str(src)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
