"""An artifact's tokenizer read straight from its tokenizer.json (TextEncoder(saved=True), what `millis.load`
does: no transformers import) gives the ids, pairs, token types and padding that AutoTokenizer gives on the
same directory, on real texts (Banking77's test file when ../shared/data is there) and on edge cases."""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from millis.encoder.source import resolve
from millis.encoder.text import TextEncoder

EDGE = ["where is my card?", "WHERE IS MY CARD", "Café naïve résumé", "你好，世界", "emoji 🙂 test", "tabs\tand\nnewlines",
        "  leading and trailing  ", "a [SEP] inside the text", "[CLS] [PAD] [MASK] [UNK]", "x" * 3000,
        " ".join(["word"] * 400), "ﬁ ligature and ＦＵＬＬＷＩＤＴＨ", "don't won't can't", "3.14159 and 1,000,000"]


def real_texts(n: int = 400) -> list[str]:
    data = Path(os.environ.get("MILLIS_DATA") or Path(__file__).resolve().parents[1].parent / "shared" / "data")
    f = data / "banking77" / "test.csv"
    if not f.is_file():
        return []
    with f.open(newline="") as fh:
        return [row["text"] for _, row in zip(range(n), csv.DictReader(fh))]


@pytest.fixture(scope="module", params=["tiny:bert", "builtin:minilm"])
def saved_dir(request, tmp_path_factory):
    """A source's tokenizer as optimize writes it into an artifact (save_pretrained), and the source."""
    from transformers import AutoTokenizer

    try:
        src = resolve(request.param)
    except Exception as e:  # noqa: BLE001 -- the builtin package may be absent on a bare machine
        pytest.skip(f"{request.param}: {e}")
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    AutoTokenizer.from_pretrained(str(src.path)).save_pretrained(str(out))
    return src, out


def test_saved_tokenizer_matches_autotokenizer(saved_dir):
    src, out = saved_dir
    names = ("input_ids", "attention_mask", "token_type_ids")
    ref, fast = TextEncoder(out, names, 128), TextEncoder(out, names, 128, saved=True)
    assert fast.tok is None and ref.tok is not None
    assert (fast.pad_id, fast.sep_id) == (ref.pad_id, ref.sep_id) and fast.sep_id is not None
    texts = EDGE + real_texts()
    for special in (True, False):
        assert fast.ids_of(texts, special) == ref.tok(texts, add_special_tokens=special, truncation=False)["input_ids"]
    assert fast.token_ids(texts) == ref.token_ids(texts)
    assert any(fast.token_ids(texts)[1])  # the long edge cases were cut
    # ... as transformers cuts them (the final [SEP] kept), by its own tokenizer, not TextEncoder's truncation twice
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(out))
    ids, cut = fast.token_ids(texts)
    assert ids == hf(texts, truncation=True, max_length=128)["input_ids"]
    assert cut == [len(r) > 128 for r in hf(texts, truncation=False)["input_ids"]]
    want = hf(texts[:32], truncation=True, max_length=128, padding=True, pad_to_multiple_of=16, return_tensors="np")
    for k in names:  # encode's batch: padded up to a multiple of 16 tokens, as HF pads it
        np.testing.assert_array_equal(fast.encode(texts[:32]).feeds[k], want[k])
    assert fast.pair_ids("where is my card?", texts[:40]) == ref.pair_ids("where is my card?", texts[:40])
    a, b = fast.encode(texts[:32]), ref.encode(texts[:32])
    assert a.lengths == b.lengths and a.truncated == b.truncated
    for k in names:
        np.testing.assert_array_equal(a.feeds[k], b.feeds[k])
    rows, _ = fast.pair_ids("q", ["a document"])
    np.testing.assert_array_equal(fast.token_types(rows, 32), ref.token_types(rows, 32))
    r, types, cut = rows[0], fast.token_types(rows, 32)[0], rows[0].index(fast.sep_id) + 1
    assert not types[:cut].any() and types[cut:len(r)].all() and not types[len(r):].any()  # "a document [SEP]": 1
    for k, v in fast.fill(texts[:5], 2, 24).items():
        np.testing.assert_array_equal(v, ref.fill(texts[:5], 2, 24)[k])


def test_token_types_are_the_tokenizers_own(saved_dir):
    """Ids and token types as AutoTokenizer gives them: a single text's types all 0, a literal separator in it or not
    (it used to start a second segment at the text's first [SEP]); a pair's second text 1, a separator in the query
    or not, cut to the model's length as truncation=True (longest_first) cuts it, what sentence-transformers'
    CrossEncoder trains on (a long query loses its end, not the whole document); no types for one token type."""
    from transformers import AutoTokenizer

    src, out = saved_dir
    names = ("input_ids", "attention_mask", "token_type_ids")
    hf = AutoTokenizer.from_pretrained(str(out))
    sep = hf.sep_token
    for enc in (TextEncoder(out, names, 64), TextEncoder(out, names, 64, saved=True)):
        single = enc.encode([f"where {sep} is my card", f"{sep} {sep} x {sep}"])
        assert not single.feeds["token_type_ids"].any()
        for q, d in ((f"lost {sep} my card", "a document"), ("q", "word " * 80), (f"{sep}", f"d {sep} e"),
                     ("query " * 50, "a short document"), ("query " * 40, "document " * 40), ("q " * 90, "d")):
            rows, cut = enc.pair_ids(q, [d])
            want = hf(q, d, truncation=True, max_length=64)
            assert rows[0] == want["input_ids"] and cut[0] == (len(hf(q, d)["input_ids"]) > 64)
            types = enc.token_types(rows, 64)[0]
            assert types[:len(rows[0])].tolist() == want["token_type_ids"] and not types[len(rows[0]):].any()
    one_type = TextEncoder(out, names, 64, saved=True, segments=False)
    assert not one_type.token_types(one_type.pair_ids("q", ["a document"])[0], 64).any()


def test_long_pairs_cut_as_hf_from_texts_cut_first(saved_dir):
    """Pairs far over the length (a 16 KB query with 20 KB documents once took 17 s and GBs: the Rust pair truncation
    builds every overflowing piece of both texts) come out as AutoTokenizer's truncation=True cuts them, cut flags
    included, while the pair tokenizer only ever sees texts of at most max_length + 2 tokens: words cut mid-piece,
    accents, CJK, one 3000-character word, either text the longer, ties, texts under the length."""
    import random

    from transformers import AutoTokenizer

    _, out = saved_dir
    hf = AutoTokenizer.from_pretrained(str(out))
    enc = TextEncoder(out, ("input_ids", "attention_mask", "token_type_ids"), 64, saved=True)
    seen = []

    class Recording:  # the pair tokenizer, noting how many tokens each text it encodes has
        def __init__(self, inner):
            self.inner = inner

        def num_special_tokens_to_add(self, pair):
            return self.inner.num_special_tokens_to_add(pair)

        def encode(self, q, d, add_special_tokens):
            seen.append(max(len(enc.ids_of([q], False)[0]), len(enc.ids_of([d], False)[0])))
            return self.inner.encode(q, d, add_special_tokens=add_special_tokens)

        def encode_batch(self, inputs, add_special_tokens):  # (long texts: off the GIL)
            return [self.encode(q, d, add_special_tokens) for q, d in inputs]
    enc._pairs = Recording(enc.pair_tokenizer())
    rng = random.Random(3)
    words = ["unbelievable", "café", "naïve", "日本語", "the", "a", ",", "supercalifragilistic", "x" * 3000, "card"]
    cases = [("q " * 2000, "d " * 2500), ("d " * 2500, "q " * 2000), ("w " * 500, "w " * 500), ("short", "d " * 900),
             ("q " * 900, "short"), ("", "d " * 100)]
    cases += [(" ".join(rng.choices(words, k=rng.randint(1, 120))), " ".join(rng.choices(words, k=rng.randint(1, 120))))
              for _ in range(120)]
    for q, d in cases:
        rows, cut = enc.pair_ids(q, [d])
        want = hf(q, d, truncation=True, max_length=64)
        assert rows[0] == want["input_ids"], (q[:40], d[:40])
        assert cut[0] == (len(hf(q, d)["input_ids"]) > 64)
    assert max(seen) <= 64 + 2


def test_saved_tokenizer_never_imports_transformers(saved_dir):
    _, out = saved_dir
    code = ("import sys; from millis.encoder.text import TextEncoder; "
            f"e = TextEncoder({str(out)!r}, ('input_ids', 'attention_mask'), 64, saved=True); "
            "assert e.token_ids(['hello world'])[0][0]; print('transformers' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=str(Path(__file__).resolve().parents[1]))
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "False"


def test_saved_without_tokenizer_json_falls_back(tmp_path):
    """A directory with only a vocabulary (no tokenizer.json) still loads, through AutoTokenizer."""
    import shutil

    from transformers import AutoTokenizer

    src = resolve("tiny:bert")
    for f in ("vocab.txt", "tokenizer_config.json"):
        shutil.copy(src.path / f, tmp_path / f)
    enc = TextEncoder(tmp_path, ("input_ids", "attention_mask"), 32, saved=True)
    assert enc.tok is not None
    assert enc.token_ids(["hello world"])[0] == [AutoTokenizer.from_pretrained(str(src.path))("hello world")["input_ids"]]


def test_long_texts_are_tokenized_off_the_gil(saved_dir):
    """Tokenizer.encode holds the GIL throughout (a 900 KB text stopped a server's event loop for 337 ms);
    encode_batch lets go of it: texts over GIL_FREE_CHARS in all (single texts, pairs, prompts) go through
    encode_batch, a few short ones through encode (no wake-up of the Rust thread pool); the same ids either way."""
    from millis.common.rust_tokenizer import GIL_FREE_CHARS, encode_all

    _, out = saved_dir
    enc = TextEncoder(out, ("input_ids", "attention_mask", "token_type_ids"), 64, saved=True)
    calls = []

    class Recording:  # the Rust tokenizer, noting which entry point each call took
        def __init__(self, inner):
            self.inner = inner

        def encode(self, text, add_special_tokens):
            calls.append("encode")
            return self.inner.encode(text, add_special_tokens=add_special_tokens)

        def encode_batch(self, texts, add_special_tokens):
            calls.append("encode_batch")
            return self.inner.encode_batch(texts, add_special_tokens=add_special_tokens)

        def __getattr__(self, name):
            return getattr(self.inner, name)
    inner = enc._fast
    short, long = "where is my card", "card " * (GIL_FREE_CHARS // 5 + 1)
    want = [e.ids for e in inner.encode_batch([short, long], add_special_tokens=True)]
    enc._fast = Recording(inner)
    assert enc.ids_of([short], True) == want[:1] and calls == ["encode"]
    calls.clear()
    assert enc.ids_of([long], True) == want[1:] and calls == ["encode_batch"]
    calls.clear()
    enc.pair_ids(long, ["a document"])  # the query's and the document's counts: off the GIL
    assert calls[0] == "encode_batch"
    calls.clear()
    assert [e.ids for e in encode_all(enc._fast, [short] * 9, True)] == [want[0]] * 9 and calls == ["encode_batch"]
    calls.clear()  # a pair of long texts (the pair tokenizer's call) goes the same way
    got = encode_all(enc._fast, [(long, short)], True)[0]
    assert calls == ["encode_batch"] and got.ids == inner.encode(long, short, add_special_tokens=True).ids


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_pairs_cut_first_on_byte_bpe_and_unigram_tokenizers(tmp_path, kind):
    """The cut-first pairs on RoBERTa's (byte-level BPE) and XLM-R's (Unigram, Metaspace) kinds of tokenizer, trained
    here on a few words: the rows and cut flags of the Rust pair truncation on the whole texts (what AutoTokenizer's
    truncation=True runs), spaced and unspaced texts, spelled special tokens; and a text whose cut never re-tokenizes
    alike (a spelled <s> before a 4,000-token word: the word cut, unbounded, once sent it all to the pair tokenizer)
    gives the pair tokenizer at most max_length + 2 tokens a text."""
    import random

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    rng = random.Random(1)
    base = ["unbelievable", "café", "naïve", "日本語", "the", "a", ",", "supercalifragilistic", "card", "transfer",
            "account", "don't", "hello", "world", "🙂", "...", "1,000"]
    corpus = [" ".join(rng.choices(base, k=30)) for _ in range(500)]
    specials = ["<s>", "<pad>", "</s>", "<unk>"]
    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
        tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        tok.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    else:
        tok = Tokenizer(models.Unigram())
        tok.normalizer, tok.pre_tokenizer = normalizers.NFKC(), pre_tokenizers.Metaspace()
        tok.train_from_iterator(corpus, trainers.UnigramTrainer(vocab_size=300, special_tokens=specials, unk_token="<unk>"))
        tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
                                                           special_tokens=[("<s>", 0), ("</s>", 2)])
    tok.save(str(tmp_path / "tokenizer.json"))
    L = 64
    enc = TextEncoder(tmp_path, ("input_ids",), L, saved=True)
    ref = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    ref.enable_truncation(L, strategy="longest_first")
    words = base + ["x" * 300, "</s>", "<s>", "\n"]
    cases = [(" ".join(rng.choices(words, k=rng.randint(1, 150))), " ".join(rng.choices(words, k=rng.randint(1, 150))))
             for _ in range(80)]
    cases += [("".join(rng.choices(words, k=rng.randint(1, 150))), "".join(rng.choices(words, k=rng.randint(1, 150))))
              for _ in range(80)]
    for q, d in cases:
        rows, cut = enc.pair_ids(q, [d])
        want = ref.encode(q, d)
        assert list(rows[0]) == want.ids and cut[0] == bool(want.overflowing), (q[:40], d[:40])
    seen = []
    pairs = enc.pair_tokenizer()

    class Recording:
        def num_special_tokens_to_add(self, pair):
            return pairs.num_special_tokens_to_add(pair)

        def encode(self, q, d, add_special_tokens):
            seen.append(max(len(enc.ids_of([q], False)[0]), len(enc.ids_of([d], False)[0])))
            return pairs.encode(q, d, add_special_tokens=add_special_tokens)

        def encode_batch(self, inputs, add_special_tokens):
            return [self.encode(q, d, add_special_tokens) for q, d in inputs]
    enc._pairs = Recording()
    for k in range(70):  # the spelled <s> lands where the query is cut
        q = "a " * k + "<s>" + "hellocard" * 500
        e = enc._fast.encode(q, add_special_tokens=False)
        if len(e.ids) > L + 2 and e.tokens[L - 1] == "<s>":
            break
    rows, cut = enc.pair_ids(q, ["a " * 31 + "<s>" + "worldcard" * 625])
    assert cut[0] and len(rows[0]) == L and max(seen) <= L + 2 + 16
