"""bench/cpu_ceiling.py: its multiply-add count against torch's FLOP counter on a real BERT, and its C kernels'
counts on whatever CPU runs the suite."""
import importlib.util
import shutil
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def ceiling():
    sys.path.insert(0, str(BENCH / "peers"))
    spec = importlib.util.spec_from_file_location("cpu_ceiling", BENCH / "cpu_ceiling.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("batch,seq", [(1, 16), (3, 24)])
def test_macs_match_torchs_flop_count_of_a_bert_forward(ceiling, batch, seq):
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import BertConfig, BertModel

    cfg = BertConfig(hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=96,
                     vocab_size=100, attn_implementation="eager")
    model = BertModel(cfg, add_pooling_layer=False).eval()
    ids = torch.randint(5, 100, (batch, seq))
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
    macs = ceiling.encoder_macs(3, 64, 96, batch, seq, "mean")
    assert macs["linear"] + macs["attention"] == fc.get_total_flops() // 2
    assert macs["attention"] == 3 * batch * 2 * seq * seq * 64


def test_cls_pooling_drops_the_last_layers_other_rows(ceiling):
    full = ceiling.encoder_macs(12, 384, 1536, 2, 128, "mean")
    cls = ceiling.encoder_macs(12, 384, 1536, 2, 128, "cls")
    others = 2 * 127  # rows past each sequence's first
    assert full["linear"] - cls["linear"] == others * (2 * 384 * 384 + 2 * 384 * 1536)
    assert full["attention"] - cls["attention"] == 2 * 2 * 128 * 128 * 384 - 2 * 2 * 128 * 384


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_each_kernel_this_cpu_has_counts_its_products(ceiling, tmp_path):
    from millis.common import hardware

    exe = ceiling.build(tmp_path)
    per_instr = {"vnni512": 64, "vnni256": 32, "bf16dot512": 32, "fma512": 16, "fma256": 8, "maddubs256": 16,
                 "maddubs256x2": 32,  # products per vpmaddubsw (its vpmaddwd not counted)
                 "amx_int8": 16 * 16 * 64, "amx_bf16": 16 * 16 * 32}  # AMX: one 16 x 16 tile of K 64 / 32
    ran = 0
    for kernel, (need, _) in ceiling.KERNELS.items():
        if not need <= hardware.cpu_flags():
            continue
        r = ceiling.run_kernel(exe, kernel, 1, 20_000)
        if kernel.startswith("amx") and r["macs"] == 0:  # the OS refused the tile state
            continue
        assert r["seconds"] > 0 and r["gmacs_per_s"] > 0
        # maddubs256: two instructions (maddubs, madd) per 32 products; AMX: one instruction per pass, not 12
        count = 20_000 * (1 if kernel.startswith("amx") else 12) * (2 if kernel == "maddubs256" else 1)
        if kernel in per_instr:
            assert r["macs"] == per_instr[kernel] * r["instructions"] == per_instr[kernel] * count
        ran += 1
    if "avx2" in hardware.cpu_flags():
        assert ran >= 2
    assert ceiling.clock_ghz(exe) > 0.3
