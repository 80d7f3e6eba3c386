"""Tiny random models with a locally built tokenizer, for tests and smoke runs.

`tiny:<family>` for each of FAMILIES (bert, distilbert, roberta, xlm-roberta, mpnet, electra, deberta-v2,
modernbert): a sequence classifier with three
labels that is also a sentence-transformers folder (mean pooling + Normalize), so one directory
serves both tasks. `tiny:<family>-reranker`: the same model with one logit, a cross-encoder as ms-marco-MiniLM
(for --task rerank and the rerank routes). `tiny:<family>-splade` (bert, distilbert, roberta): a masked LM saved as
sentence-transformers' SparseEncoder (MLMTransformer + SpladePooling), a SPLADE embedder. Built once per name into
the millis cache; weights are seeded.

The weights are drawn with initializer_range 0.2, not transformers' 0.02: at 0.02 and hidden size 32 the
attention barely mixes tokens and the classifier's logits are all but constant (every text within ~1e-4 of
the others, one argmax for all), so a test comparing logits, labels or row order could not fail. At 0.2
the logits vary across texts by ~0.2-0.6 (std per label over the shipped samples), each family's argmax
differs between them (SEEDS), and int8 variants stay within the default fidelity budget.
"""
from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

from millis.common.errors import MillisError
from millis.common.samples import sample_texts

FAMILIES = ("bert", "distilbert", "roberta", "xlm-roberta", "mpnet", "electra", "deberta-v2", "modernbert")
LABELS = {0: "negative", 1: "neutral", 2: "positive"}
RERANKER = "-reranker"  # tiny:<family>-reranker: one logit (relevance)
RERANK_LABELS = {0: "LABEL_0"}  # what transformers names a one-label head
SPLADE = "-splade"  # tiny:<family>-splade: the family's masked LM with SPLADE pooling
SPLADE_FAMILIES = ("bert", "distilbert", "roberta")  # the masked-LM heads millis.encoder.splade reads
# the vocabulary logits' bias, mean and spread: ~1 logit in 20 positive (the random weights' ~1 in 2), and some
# entries' bias itself above 0 (a text with no token must still give zeros, not relu(bias))
SPLADE_BIAS = (-2.5, 1.5)
INIT_RANGE = 0.2  # std of the normal weights (see the module's docstring)
# Each family's torch seed. Over the shipped sample texts and short forms of them as optimize judges (79 texts), of
# the seeds that make a second label the argmax of 8 or more texts, the one whose smallest gap between a text's two
# top logits is widest (a near-tie is what int8 noise flips); bert: the next one, 40 (gap 0.073; 15 texts neutral,
# 64 positive), as 12's ov-int8 flipped a label. Seeds tried: 0..399 for bert, 0..449 for electra, 0..149 for the
# others.
SEEDS = {"bert": 40, "distilbert": 91, "roberta": 55, "xlm-roberta": 108, "mpnet": 87, "electra": 316, "deberta-v2": 13,
         "modernbert": 79}
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]  # [PAD] is id 0 for every family
# tiny:<decoder>: a decoder embedder (last-token pooling + Normalize) on the same word pieces, [CLS] as its <s> and
# [SEP] as its end of text, each tokenizer's special tokens as its family's embedders put them (Qwen3-Embedding's and
# gte-Qwen2's text + <|endoftext|>, e5-mistral's <s> text </s>, a Llama tokenizer's <s> text: nothing after a text)
DECODER_TEMPLATES = {"llama": "[CLS] $A", "mistral": "[CLS] $A [SEP]", "qwen2": "$A [SEP]", "qwen3": "$A [SEP]"}
DECODER_SEEDS = {"llama": 1, "mistral": 2, "qwen2": 3, "qwen3": 4}
QUERY_PROMPT = "Instruct: Given a question, retrieve the passages that answer it\nQuery:"  # tiny:qwen3's "query"


def build_vocab() -> list[str]:
    """Word-piece vocab: specials, single characters (+ ## forms) and the sample texts' words."""
    words: set[str] = set()
    for t in sample_texts():
        words.update(re.findall(r"\w+|[^\w\s]", t.lower()))
    chars = sorted({c for w in words for c in w} | set("abcdefghijklmnopqrstuvwxyz0123456789"))
    return SPECIAL + chars + [f"##{c}" for c in chars] + sorted(words - set(chars))


def _config(family: str, vocab_size: int, labels: dict[int, str]):
    from transformers import (BertConfig, DebertaV2Config, DistilBertConfig, ElectraConfig, ModernBertConfig,
                              MPNetConfig, RobertaConfig, XLMRobertaConfig)

    common = dict(vocab_size=vocab_size, id2label=labels, label2id={v: k for k, v in labels.items()},
                  initializer_range=INIT_RANGE)
    if family == "distilbert":
        return DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=128,
                                pad_token_id=0, **common)
    shape = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                 max_position_embeddings=128, pad_token_id=0)
    shape130 = {**shape, "max_position_embeddings": 130}  # (RoBERTa, XLM-R, MPNet: positions from pad_token_id + 1)
    if family == "mpnet":  # no token types; attention adds a learned bias per relative-position bucket
        return MPNetConfig(**shape130, **common)
    if family == "electra":  # BERT's layers behind a narrower embedding and a projection up to the hidden size
        return ElectraConfig(embedding_size=16, type_vocab_size=2, **shape, **common)
    if family == "deberta-v2":  # DeBERTa-v3's layout: no absolute positions, disentangled relative attention
        return DebertaV2Config(relative_attention=True, position_biased_input=False, pos_att_type=["p2c", "c2p"],
                               position_buckets=16, norm_rel_ebd="layer_norm", share_att_key=True,
                               type_vocab_size=0, **shape, **common)
    if family == "modernbert":  # rotary positions; layer 1 attends a window of 8 tokens ([CLS] 2, [SEP] 3)
        return ModernBertConfig(layer_types=["full_attention", "sliding_attention"], local_attention=8,
                                cls_token_id=2, sep_token_id=3, bos_token_id=2, eos_token_id=3, **shape, **common)
    cls = {"bert": BertConfig, "roberta": RobertaConfig, "xlm-roberta": XLMRobertaConfig}[family]
    extra = {"type_vocab_size": 2} if family == "bert" else {"type_vocab_size": 1}
    return cls(**shape130, **extra, **common)


def _decoder_config(family: str, vocab_size: int):
    """A decoder embedder's shape: GQA (4 query heads over 2), Qwen3's head size above hidden / heads (its q / k
    heads RMS-normed), Qwen2's q / k / v biases, Mistral attending a window of 8 tokens."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  initializer_range=INIT_RANGE, pad_token_id=0, bos_token_id=2, eos_token_id=3, rms_norm_eps=1e-6)
    if family == "qwen3":
        return Qwen3Config(head_dim=32, rope_theta=1e6, **common)
    if family == "qwen2":
        return Qwen2Config(use_sliding_window=False, **common)
    if family == "mistral":
        return MistralConfig(sliding_window=8, head_dim=16, **common)
    return LlamaConfig(**common)


def save_decoder(family: str, tmp: Path, vocab: list[str]) -> None:
    """The tokenizer (DECODER_TEMPLATES), the bare decoder with every RMSNorm's weights drawn around 1 (a norm's
    weights read wrongly, or left out, changes the output), last-token pooling + Normalize."""
    import torch
    from tokenizers.implementations import BertWordPieceTokenizer
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoModel, PreTrainedTokenizerFast

    wp = BertWordPieceTokenizer(str(tmp / "vocab.txt"), lowercase=True)._tokenizer
    wp.post_processor = TemplateProcessing(single=DECODER_TEMPLATES[family],
                                           special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    PreTrainedTokenizerFast(tokenizer_object=wp, bos_token="[CLS]", eos_token="[SEP]", pad_token="[PAD]",
                            unk_token="[UNK]", model_max_length=128).save_pretrained(tmp)
    torch.manual_seed(DECODER_SEEDS[family])
    model = AutoModel.from_config(_decoder_config(family, len(vocab))).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    model.save_pretrained(tmp)
    save_mean_modules(tmp, "lasttoken", model.config.hidden_size)
    if family == "qwen3":  # Qwen3-Embedding's layout: an instruction before queries, named (TEI's prompt_name)
        (tmp / "config_sentence_transformers.json").write_text(json.dumps({
            "prompts": {"query": QUERY_PROMPT, "document": ""}, "default_prompt_name": None}))


def build_tiny(name: str, root: Path | None = None) -> Path:
    """Return the directory of the tiny model `name` (a family, a family's reranker or SPLADE model, or a decoder
    embedder), building it on first use."""
    family = name.removesuffix(RERANKER).removesuffix(SPLADE)
    if name not in DECODER_TEMPLATES and (family not in FAMILIES or (name.endswith(SPLADE) and
                                                                     family not in SPLADE_FAMILIES)):
        raise MillisError(f"unknown tiny model {name!r}; available: {', '.join('tiny:' + f for f in FAMILIES)}, "
                          f"tiny:<family>{RERANKER} (a one-logit cross-encoder), and tiny:<family>{SPLADE} for "
                          f"{', '.join(SPLADE_FAMILIES)} (a SPLADE embedder), and tiny:<decoder> for "
                          f"{', '.join(DECODER_TEMPLATES)} (a decoder embedder)")
    from millis.common.files import cache_dir

    # v2: the tokenizer has its full vocab; v3: initializer_range 0.2 (input-dependent outputs)
    out = (root or cache_dir() / "tiny-v3") / name
    if (out / "config.json").is_file():
        return out
    import torch
    from tokenizers.implementations import BertWordPieceTokenizer
    from transformers import AutoModelForMaskedLM, AutoModelForSequenceClassification, BertTokenizerFast

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{name}-"))
    vocab = build_vocab()
    (tmp / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    # transformers 5 ignores BertTokenizerFast(vocab_file=...) (a 5-token vocab): build the WordPiece
    # model with `tokenizers` and wrap it.
    wp = BertWordPieceTokenizer(str(tmp / "vocab.txt"), lowercase=True)
    tok = BertTokenizerFast(tokenizer_object=wp._tokenizer, do_lower_case=True, model_max_length=128,
                            unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
                            mask_token="[MASK]")
    if len(tok) != len(vocab):
        raise MillisError(f"tiny tokenizer has {len(tok)} tokens, expected {len(vocab)}")
    labels = RERANK_LABELS if name.endswith(RERANKER) else LABELS
    if name in DECODER_TEMPLATES:
        save_decoder(name, tmp, vocab)
    elif name.endswith(SPLADE):
        tok.save_pretrained(tmp)
        torch.manual_seed(SEEDS[family])
        model = AutoModelForMaskedLM.from_config(_config(family, len(vocab), labels)).eval()
        with torch.no_grad():  # most logits below 0, as a trained SPLADE's: sparse vectors, zeros to keep exact
            bias = model.get_output_embeddings().bias
            bias.copy_(SPLADE_BIAS[0] + SPLADE_BIAS[1] * torch.randn_like(bias))
        model.save_pretrained(tmp)
        save_splade_modules(tmp)
    else:
        tok.save_pretrained(tmp)
        torch.manual_seed(SEEDS[family])
        model = AutoModelForSequenceClassification.from_config(_config(family, len(vocab), labels)).eval()
        model.save_pretrained(tmp)
        save_mean_modules(tmp)
    try:
        tmp.rename(out)  # atomic: concurrent builders race safely, the loser's copy is dropped
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def save_splade_modules(d: Path) -> None:
    """sentence-transformers' SparseEncoder layout: the masked LM, then SPLADE pooling (max of log(1 + relu))."""
    (d / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.sparse_encoder.models.MLMTransformer"},
        {"idx": 1, "name": "1", "path": "1_SpladePooling",
         "type": "sentence_transformers.sparse_encoder.models.SpladePooling"}], indent=2))
    (d / "1_SpladePooling").mkdir()
    (d / "1_SpladePooling" / "config.json").write_text(json.dumps(
        {"pooling_strategy": "max", "activation_function": "relu", "word_embedding_dimension": None}))


def save_mean_modules(tmp: Path, mode: str = "mean_tokens", dim: int = 32) -> None:
    """sentence-transformers' layout of a mean-pooled (or `mode`: its pooling_mode_* name), normalized embedder of
    `dim` values (what sentence-transformers' Pooling reads)."""
    (tmp / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ], indent=2))
    (tmp / "1_Pooling").mkdir()
    (tmp / "1_Pooling" / "config.json").write_text(json.dumps({f"pooling_mode_{mode}": True,
                                                                   "word_embedding_dimension": dim}))
