"""millis prune: which training rows score heads and neurons, and shares that round to cutting nothing."""
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from millis.common.errors import MillisError
from millis.encoder.source import resolve

ONE_THREAD = {"threads": 1, "lr": 1e-3, "batch_size": 16, "epochs": 1}


def test_importance_rows_are_a_seeded_stratified_sample():
    from millis.train.prune import sample_rows

    labels = [y for y in range(10) for _ in range(100)]  # sorted by label, like Banking77's train.csv
    rows = sample_rows(labels, 50, seed=0)
    assert len(rows) == 50 and rows == sorted(rows)
    assert sorted(np.bincount([labels[i] for i in rows]).tolist()) == [5] * 10  # 5% of every class
    assert sample_rows(labels, 50, seed=0) == rows and sample_rows(labels, 50, seed=1) != rows
    uneven = [0] * 300 + [1] * 100
    assert np.bincount([uneven[i] for i in sample_rows(uneven, 40, seed=2)]).tolist() == [30, 10]  # in proportion
    assert sample_rows(uneven, 1000, seed=0) == list(range(400))


def test_importance_scores_rows_of_every_class_of_a_label_sorted_file(trained_classifier, topics_data):
    """The first rows of a file sorted by label are one class: importance must not score on them alone."""
    from transformers import AutoModelForSequenceClassification

    from millis.encoder.hf import load_hf
    from millis.train.classify import train_config
    from millis.train.loop import prepare
    from millis.train.prune import importance

    src = resolve(str(trained_classifier))
    td = prepare(train_config(str(trained_classifier), str(topics_data["train"]), out="unused"), src,
                 classes=["bank", "market"])
    order = sorted(range(len(td.tr_y)), key=lambda i: td.tr_y[i])  # all "bank" rows first
    td = replace(td, tr_ids=[td.tr_ids[i] for i in order], tr_y=[td.tr_y[i] for i in order])
    seen, tensors = [], td.tensors
    td.tensors = lambda rows: seen.extend(rows) or tensors(rows)
    importance(load_hf(src.path, AutoModelForSequenceClassification).eval(), td, rows=16)
    label_of = {tuple(ids): y for ids, y in zip(td.tr_ids, td.tr_y)}
    assert len(seen) == 16 and sorted(np.bincount([label_of[tuple(r)] for r in seen]).tolist()) == [8, 8]


def test_a_heads_share_that_keeps_every_head_cuts_none_and_stays_plain_hf(tmp_path, trained_classifier, topics_data):
    """tiny:bert has 4 heads: --heads 0.1 keeps round(3.6) = 4. No head cut, so no millis_pruned: the
    model loads in plain transformers and in millis's compact encoders (which refuse head-pruned models)."""
    from transformers import AutoModelForSequenceClassification

    from millis.encoder.bert_weights import EncoderConfig
    from millis.encoder.hf import load_hf
    from millis.train.prune import prune, prune_config

    events = []
    out = prune(prune_config(str(trained_classifier), str(topics_data["train"]), out=str(tmp_path / "p"),
                             heads=0.1, ffn=0.25, train=ONE_THREAD), lambda e, f: events.append((e, f)))
    cfg = json.loads((out / "config.json").read_text())
    assert "millis_pruned" not in cfg and cfg["num_attention_heads"] == 4 and cfg["intermediate_size"] == 48
    assert ("plan", {"--heads 0.1": "removes none of the 4 heads per layer: all kept"}) in events
    EncoderConfig.from_hf(cfg)  # no "pruned attention heads" refusal
    plain = AutoModelForSequenceClassification.from_pretrained(str(out)).eval()
    ours = load_hf(out, AutoModelForSequenceClassification)
    x = {"input_ids": torch.tensor([[2, 5, 9, 3]]), "attention_mask": torch.ones(1, 4, dtype=torch.long)}
    with torch.inference_mode():
        torch.testing.assert_close(plain(**x).logits, ours(**x).logits)
    with pytest.raises(MillisError, match=r"nothing to prune: --heads 0.1 of 4 heads per layer removes none"):
        prune(prune_config(str(trained_classifier), str(topics_data["train"]), out=str(tmp_path / "q"), heads=0.1,
                           train=ONE_THREAD))


def test_cutting_every_head_changes_nothing(trained_classifier):
    from transformers import AutoModelForSequenceClassification

    from millis.encoder.hf import PRUNED_KEY, cut_heads, load_hf

    model = load_hf(trained_classifier, AutoModelForSequenceClassification)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cut_heads(model, [[0, 1, 2, 3]] * 2)
    assert not hasattr(model.config, PRUNED_KEY) or getattr(model.config, PRUNED_KEY) is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
