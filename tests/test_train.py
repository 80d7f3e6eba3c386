"""millis train: learns a separable task, saves a reloadable model, is seeded, and fails clearly."""
import json
import random
from pathlib import Path

import numpy as np
import pytest

from millis.common.errors import MillisError
from millis.evaluate.run import EvalConfig, evaluate
from millis.common.readers import Labeled
from millis.encoder.source import resolve
from millis.train.holdout import split
from millis.train.loop import length_batches
from millis.artifact.meta import read_train_meta
from millis.train.classify import train_config
from millis.artifact.validation import VALIDATION_FILE

from conftest import train_one_thread


def test_training_learns_and_saves_a_reloadable_model(trained_classifier, topics_data):
    meta = read_train_meta(trained_classifier)
    assert meta.format == "millis-train" and meta.labels == ("bank", "market")
    hist = meta.history
    assert [h.epoch for h in hist] == [1, 2, 3, 4]  # patience 10: no early stop
    assert hist[-1].train_loss < hist[0].train_loss
    assert meta.best_epoch == max(hist, key=lambda h: h.val_accuracy).epoch
    assert meta.val_accuracy == max(h.val_accuracy for h in hist)
    assert meta.data.label_col == "label" and meta.data.rows == 200
    src = resolve(str(trained_classifier))
    assert src.has_classifier and src.id2label == {0: "bank", 1: "market"}
    res = evaluate(EvalConfig(model=str(trained_classifier), data=str(topics_data["test"])))
    assert res["task"] == "classify" and res["n"] == 60
    assert res["accuracy"] > 0.9, res


def test_trained_model_keeps_its_validation_split(trained_classifier, topics_data):
    """The held-out rows travel with the model (validation.jsonl): exactly the rows `split` held out of the
    training file, none of them trained on, and the rows early stopping scored (the best epoch's
    validation accuracy is the model's accuracy on them)."""
    import json

    from millis.artifact.validation import VALIDATION_FILE, read_validation
    from millis.common.readers import read_labeled

    meta = read_train_meta(trained_classifier)
    kept = read_validation(trained_classifier)
    assert meta.data.validation_file == VALIDATION_FILE and VALIDATION_FILE in meta.files
    assert len(kept) == meta.data.validation_rows == 20  # 10% of 200, per class
    assert meta.data.validation == "10% held out per class"
    rows = [json.loads(x) for x in (trained_classifier / VALIDATION_FILE).read_text().splitlines()]
    full = read_labeled(topics_data["train"])
    tr, va = split(full, meta.config["val_fraction"], meta.config["seed"])
    held = {full.lines[i] for i in va}
    assert {r["source_line"] for r in rows} == held and len(held) == 20
    assert not held & {full.lines[i] for i in tr} and len(tr) == 180  # disjoint from the training rows
    by_line = dict(zip(full.lines, zip(full.texts, full.labels)))
    assert [(r["text"], r["label"]) for r in rows] == [by_line[r["source_line"]] for r in rows]
    assert sorted(kept.labels) == ["bank"] * 10 + ["market"] * 10
    res = evaluate(EvalConfig(model=str(trained_classifier), data=str(trained_classifier / VALIDATION_FILE)))
    assert res["n"] == 20 and res["accuracy"] == pytest.approx(meta.val_accuracy)


def test_a_validation_file_is_kept_as_given(tmp_path, topics_data):
    from millis.artifact.validation import read_validation

    out = _train(tmp_path, topics_data["train"], validation=str(topics_data["test"]), limit=48, lr=3e-3, batch_size=16)
    kept, test = read_validation(out), read_labeled_file(topics_data["test"])
    assert (kept.texts, kept.labels) == (test.texts, test.labels)
    meta = read_train_meta(out)
    assert meta.data.validation == str(topics_data["test"]) and meta.data.validation_rows == 60


def read_labeled_file(path):
    from millis.common.readers import read_labeled

    return read_labeled(path)


def _weights(d):
    from safetensors.numpy import load_file

    return load_file(str(d / "model.safetensors"))


def test_same_seed_same_weights(tmp_path, topics_data, tiny_dirs):
    outs = []
    for name in ("a", "b", "c"):
        cfg = train_config("tiny:bert", str(topics_data["train"]), preset="quick", out=str(tmp_path / name),
                           limit=48, lr=3e-3, seed=1 if name == "c" else 0)
        outs.append(_weights(train_one_thread(cfg)))
    a, b, c = outs
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert any(not np.array_equal(a[k], c[k]) for k in a)  # the seed matters


def _train(tmp_path, data, **kw):
    return train_one_thread(train_config("tiny:bert", str(data), out=str(tmp_path / "m"), epochs=1, **kw))


def test_one_class_is_rejected(tmp_path):
    p = tmp_path / "one.csv"
    p.write_text("text,label\nmy card,bank\nthe atm,bank\n")
    with pytest.raises(MillisError, match="only one class \\('bank'\\) in column 'label'"):
        _train(tmp_path, p)


def test_missing_label_column_and_empty_text(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("text,category\nmy card,bank\n")
    with pytest.raises(MillisError, match=r"no column 'label' \(columns: text, category\)"):
        _train(tmp_path, p, label_col="label")
    q = tmp_path / "e.csv"
    q.write_text("text,label\nmy card,bank\nthe stock,market\nthe pin,bank\n ,market\n")
    with pytest.raises(MillisError, match=r"empty text, at line\(s\) 5"):
        _train(tmp_path, q)


def test_validation_file_with_unknown_label(tmp_path, topics_data):
    v = tmp_path / "val.csv"
    v.write_text("text,label\nmy card,bank\nthe oil prices,weather\n")
    with pytest.raises(MillisError,
                       match=r"validation file .*val\.csv has labels not in the training data: \['weather'\]"):
        _train(tmp_path, topics_data["train"], validation=str(v))


def test_bad_config_values():
    with pytest.raises(MillisError, match="--val-fraction must be between 0 and 1"):
        train_config("tiny:bert", "x.csv", val_fraction=1.0)
    with pytest.raises(MillisError, match="--batch-size must be >= 1"):
        train_config("tiny:bert", "x.csv", batch_size=0)
    with pytest.raises(MillisError, match="unknown training preset 'fast'"):
        train_config("tiny:bert", "x.csv", preset="fast")
    with pytest.raises(MillisError, match="--warmup is a share of all steps, below 1, got 4"):
        train_config("tiny:bert", "x.csv", warmup=4.0)  # the rate would never pass a quarter of --lr


def test_split_is_stratified_and_disjoint():
    labels = ("a",) * 50 + ("b",) * 30 + ("c",)
    data = Labeled(tuple(f"t{i}" for i in range(len(labels))), labels, tuple(range(len(labels))), "x", "text", "label")
    tr, va = split(data, 0.2, seed=3)
    assert not set(tr) & set(va) and sorted(tr + va) == list(range(len(labels)))
    counts = {y: sum(labels[i] == y for i in va) for y in "abc"}
    assert counts == {"a": 10, "b": 6, "c": 0}  # 20% of each class; a single example stays in training
    assert split(data, 0.2, seed=3) == (tr, va) and split(data, 0.2, seed=4) != (tr, va)


def test_length_batches_cover_every_index_once():
    rng = random.Random(0)
    lengths = [rng.randint(1, 128) for _ in range(1000)]
    batches = length_batches(lengths, 16, random.Random(1), window=5)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(1000))
    assert all(1 <= len(b) <= 16 for b in batches) and sum(len(b) < 16 for b in batches) <= 1
    # grouped by length: each batch spans far less than the whole range on average
    spread = np.mean([max(lengths[i] for i in b) - min(lengths[i] for i in b) for b in batches])
    assert spread < 45, spread  # unsorted batches span ~113
    assert length_batches(lengths, 16, random.Random(1), window=5) == batches



def test_cli_train(tmp_path, topics_data, capsys, monkeypatch):
    import torch

    from millis.cli.main import main

    monkeypatch.setenv("MILLIS_LR", "0.003")  # flags can come from the environment, typed like the flag
    before = torch.get_num_threads()
    try:
        rc = main(["train", "tiny:bert", "--data", str(topics_data["train"]), "--out", str(tmp_path / "m"),
                   "--preset", "quick", "--limit", "48", "--threads", "1", "--seed", "3"])
    finally:
        torch.set_num_threads(before)
    assert rc == 0
    out = capsys.readouterr().out
    assert out.startswith(f"model: {tmp_path / 'm'}  (best epoch 1, validation accuracy") and "2 labels" in out
    cfg = read_train_meta(tmp_path / "m").config
    assert (cfg["lr"], cfg["limit"], cfg["epochs"], cfg["seed"], cfg["batch_size"]) == (0.003, 48, 1, 3, 16)
    assert main(["train", "tiny:bert", "--data", str(tmp_path / "none.csv"), "--out", str(tmp_path / "x")]) == 2
    assert "data file not found" in capsys.readouterr().err


def test_subsample_spreads_over_a_file_sorted_by_label():
    from millis.common.readers import Labeled
    from millis.common.readers import subsample

    labels = tuple(c for c in "abcd" for _ in range(100))  # sorted by label, like Banking77's train.csv
    data = Labeled(tuple(f"t{i}" for i in range(400)), labels, tuple(range(2, 402)), "x.csv", "text", "label")
    s = subsample(data, 40, seed=0)
    assert len(s) == 40 and set(s.labels) == set("abcd")  # the first 40 rows would all be "a"
    assert list(s.lines) == sorted(s.lines) and s.texts == tuple(f"t{n - 2}" for n in s.lines)
    assert subsample(data, 40, seed=0) == s and subsample(data, 40, seed=1) != s
    assert subsample(data, 0, seed=0) is data and subsample(data, 400, seed=0) is data


def _fit_with_scores(scores, **kw):
    """fit() on a one-weight model whose epoch scores are `scores`: (FitResult, epochs run)."""
    import torch

    from millis.train.loop import fit

    model = torch.nn.Linear(1, 1)
    it = iter(scores)
    cfg = train_config("tiny:bert", "x.csv", epochs=len(scores), batch_size=4, **kw)
    res = fit(model, cfg, [3] * 8, lambda idx: (model.weight ** 2).sum(), lambda: next(it), lambda e, f: None,
              score_name="val_cosine")
    return res, len(res.history)


def test_patience_zero_means_no_early_stopping():
    res, epochs = _fit_with_scores([0.5, 0.4, 0.3, 0.2], patience=0)
    assert epochs == 4 and res.best_epoch == 1 and res.best == 0.5
    assert _fit_with_scores([0.5, 0.4, 0.3, 0.2], patience=1)[1] == 2  # 1: stop after one epoch without a gain


def test_non_finite_scores_never_win_and_all_non_finite_is_a_clear_error():
    nan = float("nan")
    res, _ = _fit_with_scores([nan, 0.3, nan], patience=0)
    assert res.best_epoch == 2 and res.best == 0.3
    res, _ = _fit_with_scores([-1.0, -1.5], patience=0)  # a cosine of -1 is still a score (below the old -1 start)
    assert res.best_epoch == 1 and res.best == -1.0
    with pytest.raises(MillisError, match=r"no epoch gave a finite val_cosine \(scores: nan, nan\): training "
                                          r"diverged; try a lower --lr"):
        _fit_with_scores([nan, nan], patience=0)


def test_a_non_finite_loss_stops_training_before_its_step_and_keeps_the_best_epoch():
    import torch

    from millis.train.loop import fit

    model = torch.nn.Linear(1, 1)
    calls, events = [], []

    def loss_of(idx):  # epoch 1 is fine (2 steps); the loss of epoch 2's first step is NaN
        calls.append(1)
        loss = (model.weight ** 2).sum()
        return loss * float("nan") if len(calls) == 3 else loss

    cfg = train_config("tiny:bert", "x.csv", epochs=3, batch_size=4, patience=0)
    res = fit(model, cfg, [3] * 8, loss_of, lambda: 0.5, lambda e, f: events.append((e, f)))
    assert [h["epoch"] for h in res.history] == [1] and res.best_epoch == 1
    assert torch.isfinite(model.weight).all()  # the NaN step's gradients never reached the weights
    assert ("diverged", {"epoch": 2, "step": 1, "loss": "nan"}) in events and len(calls) == 3
    with pytest.raises(MillisError, match=r"scores: none; the loss was inf at epoch 1 step 1\): training diverged"):
        fit(model, cfg, [3] * 8, lambda idx: (model.weight ** 2).sum() * float("inf"), lambda: 0.5,
            lambda e, f: None)


def test_validation_accuracy_of_non_finite_logits_is_nan():
    import math
    from types import SimpleNamespace

    import torch

    from millis.train.loop import val_accuracy

    class NaNModel(torch.nn.Module):  # argmax reads a NaN row as class 0: an accuracy it never earned
        def forward(self, **batch):
            return SimpleNamespace(logits=torch.full((batch["input_ids"].shape[0], 2), float("nan")))

    td = SimpleNamespace(va_ids=[[1, 2], [1, 2, 3]], va_y=[0, 0],
                         tensors=lambda rows: {"input_ids": torch.zeros((len(rows), 3), dtype=torch.long)})
    assert math.isnan(val_accuracy(NaNModel(), td))
    good = SimpleNamespace(va_ids=td.va_ids, va_y=[1, 1], tensors=td.tensors)

    class One(torch.nn.Module):
        def forward(self, **batch):
            return SimpleNamespace(logits=torch.tensor([[0.0, 1.0]]).repeat(batch["input_ids"].shape[0], 1))

    assert val_accuracy(One(), good) == 1.0


def _relabelled_copy(src: Path, dst: Path, id2label: dict[int, str], flip: bool) -> Path:
    """`src` (an HF classifier dir) with new label names; `flip`: the head's rows reversed too."""
    import shutil

    from safetensors.torch import load_file, save_file

    dst.mkdir()
    for f in src.iterdir():
        if f.name not in ("millis.json", VALIDATION_FILE):
            shutil.copy(f, dst / f.name)
    sd = load_file(str(dst / "model.safetensors"))
    if flip:
        for k in ("classifier.weight", "classifier.bias"):
            sd[k] = sd[k].flip(0).contiguous()
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    cfg["id2label"] = {str(i): v for i, v in id2label.items()}
    cfg["label2id"] = {v: i for i, v in id2label.items()}
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_training_a_classifier_further_keeps_what_its_head_rows_mean(tmp_path, trained_classifier, topics_data):
    # the same model with its labels in another order (as ProsusAI/finbert: positive, negative, neutral)
    src = _relabelled_copy(trained_classifier, tmp_path / "s", {0: "market", 1: "bank"}, flip=True)
    test = str(topics_data["test"])
    assert evaluate(EvalConfig(model=str(src), data=test))["accuracy"] > 0.9
    out = train_one_thread(train_config(str(src), str(topics_data["train"]), out=str(tmp_path / "m"), lr=1e-9,
                                        epochs=1))
    assert resolve(str(out)).id2label == {0: "market", 1: "bank"}  # the file's sorted order swapped them
    assert evaluate(EvalConfig(model=str(out), data=test))["accuracy"] > 0.9


def test_training_a_classifier_on_other_labels_draws_a_new_head(tmp_path, trained_classifier, topics_data):
    from safetensors.torch import load_file

    src = _relabelled_copy(trained_classifier, tmp_path / "s", {0: "pos", 1: "neg"}, flip=False)
    out = train_one_thread(train_config(str(src), str(topics_data["train"]), out=str(tmp_path / "m"), lr=1e-9,
                                        epochs=1))
    assert resolve(str(out)).id2label == {0: "bank", 1: "market"}
    before, after = load_file(str(src / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert not torch_close(before["classifier.weight"], after["classifier.weight"])  # pos / neg rows dropped
    assert torch_close(before["bert.embeddings.word_embeddings.weight"],
                       after["bert.embeddings.word_embeddings.weight"], atol=1e-6)  # the encoder is kept


def torch_close(a, b, atol=1e-4) -> bool:
    import torch

    return a.shape == b.shape and bool(torch.allclose(a.float(), b.float(), atol=atol))


def test_relative_paths_are_recorded_absolute(tmp_path, topics_data, monkeypatch):
    import shutil

    from millis.artifact.validation import selection_files
    from millis.common.files import cache_dir

    work = tmp_path / "work dir"
    work.mkdir()
    shutil.copy(topics_data["train"], work / "train.csv")
    shutil.copy(topics_data["test"], work / "val.csv")
    monkeypatch.chdir(work)
    out = train_one_thread(train_config("tiny:bert", "train.csv", out="m", validation="val.csv", limit=48,
                                        epochs=1))
    monkeypatch.chdir(tmp_path)  # read from elsewhere: relative records named files that are not here
    meta = read_train_meta(work / "m")
    assert meta.data.path == str(work / "train.csv") and meta.train_config["data"] == str(work / "train.csv")
    assert meta.train_config["validation"] == str(work / "val.csv")
    assert work / "val.csv" in selection_files(work / "m")
    assert resolve("work dir/m").path == work / "m"  # what artifacts record as the fp32 source
    assert str(out) == "m"
    monkeypatch.setenv("MILLIS_CACHE", "")
    assert cache_dir() == Path.home() / ".cache" / "millis"  # empty: unset (it was the current directory)
    monkeypatch.setenv("MILLIS_CACHE", "rel")
    assert cache_dir() == tmp_path / "rel"
