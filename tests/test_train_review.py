"""Review 2026-12-06: a trained model runs (eval, optimize, serve) at the max length it trained at, which is
recorded as the length used (within the model's positions); texts cut to it are counted and said."""
import json
import shutil
from dataclasses import replace

import torch

from millis.artifact.meta import read_train_meta
from millis.encoder.source import model_max_length, resolve
from millis.train.classify import train, train_config

FAST = {"lr": 3e-3, "batch_size": 16, "patience": 10, "threads": 1}


def train_with_events(cfg):
    """`train` on one thread (torch's global count restored), with its progress events."""
    events, before = [], torch.get_num_threads()
    try:
        return train(replace(cfg, threads=1), lambda e, f: events.append((e, f))), events
    finally:
        torch.set_num_threads(before)


def test_a_trained_model_runs_at_the_length_it_trained_at(tmp_path, topics_data, tiny_dirs):
    from millis.artifact.model import open_model
    from millis.artifact.validation import VALIDATION_FILE
    from millis.evaluate.run import EvalConfig, evaluate

    out, events = train_with_events(train_config("tiny:bert", str(topics_data["train"]), out=str(tmp_path / "m"),
                                                 max_length=6, limit=80, epochs=2, **FAST))
    meta = read_train_meta(out)
    assert meta.config["max_length"] == 6
    cut = meta.data.truncated
    assert cut is not None and 0 < cut["train"] <= 72 and 0 <= cut["validation"] <= 8
    notes = [f["note:"] for e, f in events if e == "plan" and "note:" in f]
    assert notes == [f"{cut['train']} of 72 training and {cut['validation']} of 8 validation texts are cut to 6 "
                     f"tokens (--max-length)"], events
    # every later load reads the trained length: optimize (model_max_length), eval and serve (open_model)
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 6
    assert model_max_length(resolve(str(out))) == 6 and open_model(str(out)).max_length == 6
    res = evaluate(EvalConfig(model=str(out), data=str(out / VALIDATION_FILE), threads=1))
    assert res["max_length"] == 6 and res["truncated"] == cut["validation"]
    assert res["accuracy"] == meta.val_accuracy  # the validation rows score as training scored them


def test_a_max_length_past_the_models_positions_records_the_length_used(tmp_path, topics_data, tiny_dirs):
    positions = resolve("tiny:bert").max_length
    out, events = train_with_events(train_config("tiny:bert", str(topics_data["train"]), out=str(tmp_path / "m"),
                                                 max_length=100000, limit=40, epochs=1, **FAST))
    assert read_train_meta(out).config["max_length"] == positions  # not the 100000 asked for
    assert model_max_length(resolve(str(out))) == positions
    warned = [f["warning:"] for e, f in events if e == "plan" and "warning:" in f]
    assert warned == [f"--max-length 100000 is above the {positions} positions of tiny:bert: texts are cut to "
                      f"{positions} tokens (the length recorded and run at)"]


def test_a_sentence_transformers_folder_runs_at_the_pinned_length(tmp_path, tiny_dirs):
    """An embedding student keeps its teacher's sentence_bert_config.json, whose max_seq_length is read first."""
    from millis.train.loop import pin_length

    d = tmp_path / "st"
    shutil.copytree(tiny_dirs["bert"], d)
    (d / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 64, "do_lower_case": False}))
    assert model_max_length(resolve(str(d))) == 64
    pin_length(d, 16)
    assert model_max_length(resolve(str(d))) == 16
    assert json.loads((d / "tokenizer_config.json").read_text())["model_max_length"] == 16
