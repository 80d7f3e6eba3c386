"""RoBERTa and XLM-R on millis's compact encoder (native CPU kernels; the CUDA encoder's CPU form): BERT's layers with
positions counted from the padding index + 1 and RoBERTa's classification head read as BERT's pooler + classifier
(every native precision against HF: tests/test_variants.py). Here a real RoBERTa's padding index (1: positions from
row 2), texts up to the last position row, and a longer sequence refused."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import compact_cpu_outputs, native_fp32, reference_outputs
from millis.artifact.model import run_texts
from millis.common.errors import MillisError
from millis.common.samples import sample_texts
from millis.gpu.encoder import RunOptions, from_hf

CPU = RunOptions(dtype="fp32", fuse="torch", device="cpu")


@pytest.fixture(scope="module")
def roberta_pad1(tmp_path_factory, tiny_dirs):
    """tiny:roberta saying pad_token_id 1, as roberta-base does (its position table's rows 0 and 1 unused); the tiny
    vocab's id 1 ([UNK]) is in no sample text, so HF's position ids count every token."""
    d = tmp_path_factory.mktemp("rb") / "roberta-pad1"
    shutil.copytree(tiny_dirs["roberta"], d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**cfg, "pad_token_id": 1}))
    return d


@pytest.mark.parametrize("task", ["classify", "embed"])
def test_roberta_positions_count_from_the_padding_index(tmp_path, roberta_pad1, task):
    import torch

    texts = sample_texts()[:4] + [" ".join(sample_texts() * 3)]  # the last: cut at 128 tokens, the last position
    src, enc, native = native_fp32(roberta_pad1, task, tmp_path, threads=1)
    assert src.max_length == 128  # 130 rows less pad_token_id + 1
    assert enc.encode(texts).lengths[-1] == 128
    want = reference_outputs(roberta_pad1, task, texts)
    np.testing.assert_allclose(run_texts(native, enc, texts).outputs, want, atol=1e-4)
    np.testing.assert_allclose(compact_cpu_outputs(roberta_pad1, task, src.pooling, enc, texts), want, atol=1e-4)
    compact = from_hf(roberta_pad1, task, src.pooling, CPU)
    long = np.full((1, 129), 5)
    with pytest.raises(MillisError, match="exceeds the model's 128 positions"):
        native.run({"input_ids": long, "attention_mask": np.ones_like(long), "token_type_ids": np.zeros_like(long)})
    with pytest.raises(MillisError, match="exceeds the model's 128 positions"):
        compact(torch.from_numpy(long), torch.ones(1, 129, dtype=torch.int64))


def test_bert_names_reads_robertas_positions_and_head(tiny_dirs):
    from millis.encoder.bert_weights import EncoderConfig, bert_names

    cfg = EncoderConfig.from_hf(json.loads((tiny_dirs["xlm-roberta"] / "config.json").read_text()))
    assert (cfg.pos_offset, cfg.max_positions, cfg.type_vocab) == (1, 129, 1)
    state = {"roberta.embeddings.position_embeddings.weight": np.arange(130 * 2).reshape(130, 2),
             "classifier.dense.weight": 1, "classifier.out_proj.weight": 2, "classifier.out_proj.bias": 3,
             "roberta.pooler.dense.weight": 9}  # a base model's pooler beside the head: the head's dense is read
    named = bert_names(state, cfg)
    assert named["embeddings.position_embeddings.weight"][0].tolist() == [2, 3]  # row 1 is position 0
    assert (named["pooler.dense.weight"], named["classifier.weight"], named["classifier.bias"]) == (1, 2, 3)
    bert = EncoderConfig.from_hf(json.loads((tiny_dirs["bert"] / "config.json").read_text()))
    assert bert.pos_offset == 0 and bert_names({"bert.classifier.dense.weight": 1}, bert) == {"classifier.dense.weight": 1}
