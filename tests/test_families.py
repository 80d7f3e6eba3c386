"""MPNet, ELECTRA, DeBERTa-v2 (v3's layout) and ModernBERT on the runtimes that run any supported family (PyTorch,
ONNX Runtime, OpenVINO), against transformers fp32: their relative positions (MPNet's bucketed bias, DeBERTa's
disentangled attention), ELECTRA's embedding projection and ModernBERT's rotary positions and sliding window must
survive the export at every length, pairs must go in as HF encodes them, and a checkpoint that lacks one of their
encoder weights is refused. millis's compact encoder (native CPU, CUDA) runs BERT, DistilBERT, RoBERTa and XLM-R
only and says so."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import reference_outputs
from millis.artifact.model import open_model, run_pairs
from millis.common.errors import MillisError
from millis.common.samples import sample_texts
from millis.encoder.source import resolve

NEW = ("mpnet", "electra", "deberta-v2", "modernbert")


def texts_of_every_length() -> list[str]:
    """Short and long texts: a long one (past ModernBERT's 8-token window and DeBERTa's 16 position buckets) and
    one cut at the tiny models' 128 tokens."""
    s = sample_texts()
    return s[:6] + [" ".join(s[:4]), " ".join(s * 3)]


@pytest.mark.slow
@pytest.mark.parametrize("family", NEW)
def test_fp32_graphs_match_transformers(tmp_path, tiny_dirs, family):
    """ONNX Runtime's fused graph and OpenVINO's, built as optimize builds them, in batches and one text a call."""
    from millis.artifact.model import run_texts
    from millis.encoder.text import TextEncoder
    from millis.optimize.build.variants import CATALOG, Builder
    from millis.optimize.judge import open_variant

    src = resolve(f"tiny:{family}")
    texts = texts_of_every_length()
    want = reference_outputs(tiny_dirs[family], "classify", texts)
    enc = TextEncoder(src.path, src.input_names, 128, segments=src.segments)
    builder = Builder(src, "classify", tmp_path, calibration=lambda: [])
    for name in ("ort-fp32-fused", "ov-fp32"):
        vdir, _ = builder.build(CATALOG[name])
        rt = open_variant("classify", 1, src, CATALOG[name], vdir)
        batched = run_texts(rt, enc, texts)
        assert batched.truncated[-1] and not batched.truncated[0]
        np.testing.assert_allclose(batched.outputs, want, atol=1e-4, err_msg=name)
        alone = np.concatenate([run_texts(rt, enc, [t]).outputs for t in texts])
        np.testing.assert_allclose(alone, want, atol=1e-4, err_msg=name)


@pytest.mark.parametrize("family", NEW)
def test_pytorch_embeds_as_sentence_transformers_pools(tiny_dirs, family):
    texts = texts_of_every_length()
    got = open_model(f"tiny:{family}", task="embed").embed(texts)
    want = reference_outputs(tiny_dirs[family], "embed", texts)
    assert got.shape == want.shape
    assert (got * want).sum(1).min() > 0.99999


@pytest.mark.parametrize("family", NEW)
def test_pairs_score_as_hf_encodes_them(tiny_dirs, family):
    """ELECTRA embeds token types (the document is type 1); the others have none, and get no token_type_ids."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    m = open_model(f"tiny:{family}", task="classify")
    assert m.encoder.segments is (family == "electra")
    pairs = [("where is my card", "my card is lost"), ("rates", " ".join(sample_texts()[:3]))]
    got = run_pairs(m.runtime, m.encoder, pairs).outputs
    hf = AutoModelForSequenceClassification.from_pretrained(str(tiny_dirs[family]), attn_implementation="eager").eval()
    tok = AutoTokenizer.from_pretrained(str(tiny_dirs[family]))
    keep = {"input_ids", "attention_mask"} | ({"token_type_ids"} if family == "electra" else set())
    with torch.no_grad():
        want = np.concatenate([hf(**{k: v for k, v in tok(q, d, return_tensors="pt").items() if k in keep}).logits
                               .numpy() for q, d in pairs])
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("family,weight", [("mpnet", "encoder.relative_attention_bias.weight"),
                                           ("electra", "embeddings_project.weight"),
                                           ("deberta-v2", "encoder.rel_embeddings.weight"),
                                           ("modernbert", "layers.1.attn_norm.weight"),
                                           ("modernbert", "final_norm.weight")])
def test_a_checkpoint_without_an_encoder_weight_is_refused(tmp_path, tiny_dirs, family, weight):
    """transformers would draw the missing weight at random, another one every load."""
    from safetensors.numpy import load_file, save_file

    d = tmp_path / family
    shutil.copytree(tiny_dirs[family], d)
    state = load_file(str(d / "model.safetensors"))
    gone = [k for k in state if k.endswith(weight)]
    assert len(gone) == 1, gone
    save_file({k: v for k, v in state.items() if k != gone[0]}, str(d / "model.safetensors"))
    with pytest.raises(MillisError, match="do not fit"):
        open_model(str(d), task="embed")


def test_a_modernbert_cut_keeps_its_first_layer(tiny_dirs):
    """ModernBERT's layer 0 alone has no attention norm: a student starting at another layer would reload without
    that layer's norm (transformers builds layer 0 without one), so the cut refuses it; a cut from layer 0 keeps
    each layer's attention kind."""
    from transformers import AutoModel

    from millis.encoder.hf import cut_layers, layer_list

    model = AutoModel.from_pretrained(str(tiny_dirs["modernbert"]))
    assert model.config.layer_types == ["full_attention", "sliding_attention"]
    with pytest.raises(MillisError, match="first layer"):
        cut_layers(model, [1])
    cut_layers(model, [0])
    assert len(layer_list(model)) == 1 and model.config.layer_types == ["full_attention"]


def test_the_compact_encoder_names_the_family_it_runs(tiny_dirs):
    from millis.encoder.bert_weights import EncoderConfig

    cfg = json.loads((Path(tiny_dirs["bert"]) / "config.json").read_text())
    with pytest.raises(MillisError, match="supports BERT-family models.*not 'albert'"):
        EncoderConfig.from_hf({**cfg, "model_type": "albert"})
    assert resolve("tiny:mpnet").input_names == ("input_ids", "attention_mask")


def spm_only_folder(tmp_path, tiny_dirs) -> Path:
    """microsoft/deberta-v3-base's layout: tiny:deberta-v2 with a SentencePiece model (spm.model, its specials at the
    tiny vocab's ids: [PAD] 0, [UNK] 1, [CLS] 2, [SEP] 3, [MASK] 4) and no tokenizer.json."""
    import io

    import sentencepiece

    d = tmp_path / "deberta-spm"
    shutil.copytree(tiny_dirs["deberta-v2"], d)
    for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        (d / f).unlink(missing_ok=True)
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sample_texts() * 3), model_writer=model, vocab_size=150, model_type="unigram",
        pad_id=0, unk_id=1, bos_id=-1, eos_id=-1, pad_piece="[PAD]", unk_piece="[UNK]",
        user_defined_symbols=["[CLS]", "[SEP]", "[MASK]"], minloglevel=2)
    (d / "spm.model").write_bytes(model.getvalue())
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "DebertaV2Tokenizer", "model_max_length": 128, "do_lower_case": False,
        **{f"{k}_token": f"[{k.upper()}]" for k in ("unk", "pad", "cls", "sep", "mask")},
        "bos_token": "[CLS]", "eos_token": "[SEP]"}))
    return d


def test_a_sentencepiece_tokenizer_runs_as_hf_reads_it(tmp_path, tiny_dirs):
    """sentencepiece is a dependency: a DeBERTa-v3 folder with only spm.model tokenizes as transformers does."""
    d = spm_only_folder(tmp_path, tiny_dirs)
    texts = texts_of_every_length()
    got = np.array([p["logits"] for p in open_model(str(d), task="classify").predict(texts)])
    np.testing.assert_allclose(got, reference_outputs(d, "classify", texts), atol=1e-5)


def test_a_sentencepiece_tokenizer_without_its_package_is_named(tmp_path, tiny_dirs, monkeypatch):
    """Without sentencepiece transformers fell through to a 41-line traceback about tiktoken; one line names it."""
    import millis.encoder.source as source

    d = spm_only_folder(tmp_path, tiny_dirs)
    monkeypatch.setattr(source, "find_spec", lambda name: None)
    with pytest.raises(MillisError, match=r"SentencePiece model \(spm.model\).*pip install sentencepiece"):
        resolve(str(d))


def test_a_tokenizer_transformers_cannot_read_is_one_error(tmp_path, tiny_dirs):
    from millis.encoder.text import TextEncoder

    d = tmp_path / "broken"
    shutil.copytree(tiny_dirs["electra"], d)
    (d / "tokenizer.json").write_text("{not json")
    with pytest.raises(MillisError, match="cannot load its tokenizer"):
        TextEncoder(d, ("input_ids", "attention_mask"), 128)
