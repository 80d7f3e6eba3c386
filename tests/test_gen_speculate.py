"""Prompt-lookup speculative decoding (millis/gen/speculate.py) on the native models: drafts found by
suffix lookup, greedy text identical with and without drafts (alone, batched, beside sampled rows,
up to max_tokens and EOS), acceptance counted, and drafting switched off where it does not pay."""
import numpy as np
import pytest
from gguf_fixtures import random_llama_tensors, write_tiny_gguf

from millis.gen import EngineConfig, SamplingParams, open_engine
from millis.gen.config import LlamaConfig
from millis.gen.engine import run_all
from millis.gen.speculate import FIRST_DRAFTS, MIN_VERIFIES, DraftStats, lookup, verify

CFG = LlamaConfig(vocab_size=320, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq=256, hidden_dim=128,
                  norm_eps=1e-5, rope_theta=10000.0)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("spec") / "tiny.gguf")
    write_tiny_gguf(path, CFG, random_llama_tensors(CFG, "Q4_0", embed_qtype="Q8_0"))
    return path


def test_lookup_takes_what_followed_the_latest_match():
    assert lookup([1, 2, 3, 9, 8, 1, 2, 3], 3) == [9, 8, 1]      # the 3-gram [1, 2, 3]
    assert lookup([5, 2, 3, 7, 1, 2, 3, 4, 6, 2, 3], 2) == [4, 6]  # [2, 3] last seen before the end at 5
    assert lookup([4, 1, 7, 9, 9, 1], 4) == [7, 9, 9, 1]          # only a 1-gram matches
    assert lookup([1, 2, 3, 1, 2, 3], 10) == [1, 2, 3]            # no further than the sequence
    assert lookup([1, 2, 3], 4) == [] and lookup([7], 4) == []


def test_drafting_switches_off_when_it_gains_little():
    s = DraftStats()
    for _ in range(MIN_VERIFIES - 1):
        s.record(2, 0)
    assert not s.off  # too few tries to judge
    s.record(2, 0)
    assert s.off
    long = DraftStats()  # 8-token drafts keeping 2 each: 25% of drafted tokens (switched off before), 2 a verify
    for _ in range(10):
        long.record(8, 2)
    assert not long.off and long.verifies == 10 and (long.drafted, long.accepted) == (80, 20)


def test_a_larger_speculate_never_takes_more_steps(shared_stories):
    """stories260K: with the share of drafted tokens kept as the rule, speculate 4 to 12 switched every request off
    (1.04 tokens a step against 1.15 at 3, 8 prompts of 200 tokens); with the gain per verify as the rule, a larger
    speculate gives at least the tokens a step of a smaller one."""
    texts = ["Once upon a time", "The cat sat on the mat. The cat sat", "Sue had a red ball. Sue had a red ball. Sue",
             "Once upon a time, there was a little girl named Lily. She loved to play outside. Once upon a time,"]
    steps = {}
    for k in (0, 3, 8):
        e = open_engine(shared_stories, EngineConfig(max_batch=1, threads=1, speculate=k))
        steps[k] = 0
        for t in texts:
            e.add(e.tok.encode(t), SamplingParams(max_tokens=120, ignore_eos=True))
            while e.has_work:
                e.step()
                steps[k] += 1
    assert steps[8] <= steps[3] < steps[0] == 4 * 120, steps


def test_greedy_text_identical_with_and_without_drafts(model_path):
    story = [1] + [10 + (i % 23) for i in range(60)]  # a prompt that repeats: drafts find matches
    prompts = [story, story[:30] + [200, 201], [1, 5, 6, 7, 5, 6], story[5:50]]
    greedy = SamplingParams(max_tokens=24, ignore_eos=True)
    plain = open_engine(model_path, EngineConfig(max_batch=4, max_seq=128, threads=2))
    spec = open_engine(model_path, EngineConfig(max_batch=4, max_seq=128, threads=2, speculate=4))
    want = [run_all(plain, [p], greedy)[0] for p in prompts]
    assert [run_all(spec, [p], greedy)[0] for p in prompts] == want
    assert run_all(spec, prompts, greedy) == want  # batched: drafted and plain rows in one step
    d = spec.draft_stats  # random weights repeat nothing: drafts are tried, rejected, then switched off
    assert 0 < d.drafted <= 8 * (MIN_VERIFIES * FIRST_DRAFTS + 4) and d.accepted <= d.drafted and plain.draft_stats.drafted == 0
    sampled = SamplingParams(max_tokens=12, temperature=0.8, seed=3)  # sampled rows never draft
    assert run_all(spec, [story], sampled) == run_all(plain, [story], sampled)
    a, b = spec.add(story, greedy), spec.add(story[:40], sampled)  # one step: a verifies, b samples its logits
    got: dict = {a: [], b: []}
    while spec.has_work:
        for o in spec.step():
            got[o.id] += o.token_ids
    assert got[a] == want[0] and got[b] == run_all(plain, [story[:40]], sampled)[0]
    short = SamplingParams(max_tokens=3, ignore_eos=True)  # a draft never runs past max_tokens
    assert run_all(spec, [story], short) == run_all(plain, [story], short) and len(run_all(spec, [story], short)[0]) == 3
    assert spec.free_slots == 4 and spec.kv.in_use == 0 and sum(spec.kv.pending) == 0


@pytest.mark.parametrize("fields", [dict(repetition_penalty=1.3), dict(presence_penalty=1.0),
                                    dict(frequency_penalty=0.7), dict(logit_bias=((11, 4.0), (12, -3.0)))])
def test_penalized_and_biased_rows_never_draft(model_path, fields):
    """A greedy row whose logits are changed (penalties, logit bias) is not the argmax of the model's own
    logits that drafts verify: it decodes plainly, with the text of an engine that never drafts."""
    story = [1] + [10 + (i % 23) for i in range(60)]
    params = SamplingParams(max_tokens=20, ignore_eos=True, **fields)
    plain = open_engine(model_path, EngineConfig(max_batch=2, max_seq=128, threads=2))
    spec = open_engine(model_path, EngineConfig(max_batch=2, max_seq=128, threads=2, speculate=4))
    want = run_all(plain, [story, story[:40]], params)
    assert run_all(spec, [story, story[:40]], params) == want and spec.draft_stats.drafted == 0
    assert want[0] != run_all(plain, [story], SamplingParams(max_tokens=20, ignore_eos=True))[0], "fields change it"


class ScriptedModel:
    """forward_flat whose greedy choice after each position is `script[position]`."""

    def __init__(self, script: list[int]) -> None:
        self.script, self.calls = script, []

    def forward_flat(self, ids, pos, slots, out_rows):
        self.calls.append((ids.tolist(), pos.tolist(), slots.tolist()))
        logits = np.zeros((len(out_rows), 50), np.float32)
        logits[np.arange(len(out_rows)), [self.script[p] for p in pos[out_rows]]] = 1.0
        return logits


def test_verify_keeps_the_agreeing_prefix_and_the_next_token():
    m = ScriptedModel(list(range(10, 40)))  # after position p the model says 10 + p
    rows = [(5, 3, 0, [14, 15, 99]),  # position 3 -> 13: the draft's first token is already wrong
            (7, 4, 1, [14, 15, 16]),  # all three right, and the model's next token 17
            (2, 6, 2, [16, 42])]      # one right, then 17 instead of 42
    assert verify(m, rows) == [[13], [14, 15, 16, 17], [16, 17]]
    ids, pos, slots = m.calls[0]  # one forward: every row's last token and draft at its own positions
    assert ids == [5, 14, 15, 99, 7, 14, 15, 16, 2, 16, 42] and pos[:4] == [3, 4, 5, 6] and slots[-1] == 2



def test_real_model_quoting_its_input_accepts_drafts_with_identical_text(smollm2):
    passage = ("The warehouse in Leeds ships orders placed before 3 pm on the same day. Orders placed later "
               "ship the next working day, and weekend orders ship on Monday.")
    eng_cfg = dict(max_batch=1, max_seq=512, threads=2)
    plain = open_engine(smollm2, EngineConfig(**eng_cfg))
    spec = open_engine(smollm2, EngineConfig(**eng_cfg, speculate=6))
    prompt = plain.tok.encode(f"Copy this text exactly.\nText: {passage}\nCopy: {passage[:30]}")
    greedy = SamplingParams(max_tokens=32, ignore_eos=True)
    assert run_all(spec, [prompt], greedy) == run_all(plain, [prompt], greedy)
    d = spec.draft_stats
    assert d.accepted >= d.drafted / 2 and d.accepted >= 16  # a quote: most draft tokens are right


def test_draft_model_gives_the_targets_greedy_text(model_path, tmp_path):
    """A draft model (another GGUF of the same vocabulary) proposes the tokens; the target verifies them.
    The target's own file as its draft is always right; a different random model is mostly wrong;
    either way the text is the target's plain greedy text, alone and batched beside a sampled row."""
    from millis.common.errors import MillisError

    other = str(tmp_path / "other.gguf")
    small = LlamaConfig(**{**CFG.__dict__, "dim": 32, "hidden_dim": 64, "n_layers": 1})
    write_tiny_gguf(other, small, random_llama_tensors(small, "Q8_0", seed=5))
    story = [1] + [10 + (i % 23) for i in range(40)]
    prompts = [story, [1, 40, 41, 42], [1] + [100 + i for i in range(70)]]
    greedy = SamplingParams(max_tokens=30, ignore_eos=True)
    plain = open_engine(model_path, EngineConfig(max_batch=4, max_seq=256, threads=2))
    want = run_all(plain, prompts, greedy)
    for draft, all_right in ((model_path, True), (other, False)):
        eng = open_engine(model_path, EngineConfig(max_batch=4, max_seq=256, threads=2, speculate=4,
                                                   draft_model=draft))
        assert [run_all(eng, [p], greedy)[0] for p in prompts] == want
        d = eng.draft_stats
        assert d.drafted > 0 and (d.accepted == d.drafted if all_right else d.accepted < d.drafted)
        sampled = eng.add([1, 7, 8], SamplingParams(max_tokens=20, temperature=1.0, seed=3, ignore_eos=True))
        ids = [eng.add(p, greedy) for p in prompts]
        got = {i: [] for i in ids + [sampled]}
        while eng.has_work:
            for o in eng.step():
                got[o.id] += o.token_ids
        assert [got[i] for i in ids] == want and len(got[sampled]) == 20
        assert not eng.drafter.done and eng.drafter.kv.in_use == 0  # every slot's draft cache given back
    wrong = str(tmp_path / "wrong.gguf")
    write_tiny_gguf(wrong, LlamaConfig(**{**small.__dict__, "vocab_size": 384}),
                    random_llama_tensors(LlamaConfig(**{**small.__dict__, "vocab_size": 384}), "Q8_0"))
    with pytest.raises(MillisError, match="vocabulary"):
        open_engine(model_path, EngineConfig(max_batch=1, max_seq=256, speculate=2, draft_model=wrong))
    with pytest.raises(MillisError, match="speculate"):
        EngineConfig(draft_model=other)


def test_draft_model_with_a_shorter_context_drafts_for_the_rows_that_fit(model_path, tmp_path):
    """A request longer than the draft model's context goes without drafts alone: its batch-mates' drafts
    go on (once, its draft forward raised and every row lost its drafts on every step), with the same text."""
    from dataclasses import replace

    short = str(tmp_path / "ctx64.gguf")
    write_tiny_gguf(short, replace(CFG, max_seq=64), random_llama_tensors(CFG, "Q4_0", embed_qtype="Q8_0"))
    story = [1] + [10 + (i % 23) for i in range(40)]  # repeats: the target's own weights draft it right
    long_prompt = [1] + [3 + (i * 7) % 300 for i in range(90)]  # 91 + 20 positions: past the draft's 64
    greedy = SamplingParams(max_tokens=20, ignore_eos=True)
    want = run_all(open_engine(model_path, EngineConfig(max_batch=2, max_seq=160, threads=2)), [story, long_prompt],
                   greedy)
    drafted = []
    for prompts in ([story], [story, long_prompt]):
        eng = open_engine(model_path, EngineConfig(max_batch=2, max_seq=160, threads=2, speculate=3, draft_model=short))
        assert run_all(eng, prompts, greedy) == want[:len(prompts)]
        drafted.append((eng.draft_stats.drafted, eng.draft_stats.accepted))
    assert drafted[0][0] > 0 and drafted[1] == drafted[0], drafted  # the story drafts as much beside the long one


def test_the_kept_index_finds_what_a_scan_finds():
    """NgramIndex (kept up as tokens come, a dict read a step) against `lookup` over the whole context, for
    every prefix of random token streams with repeats, split between prompt and output anywhere."""
    import random

    from millis.gen.speculate import NgramIndex

    rng = random.Random(0)
    for trial in range(40):
        seq = [rng.randrange(6 if trial % 2 else 40) for _ in range(rng.randrange(1, 120))]
        split = rng.randrange(0, len(seq) + 1)
        index = NgramIndex()
        for end in range(max(split, 1), len(seq) + 1):  # the prompt, then one output token at a time
            prompt, out = seq[:split] if split else seq[:1], seq[max(split, 1):end]
            for k, min_n in ((4, 1), (2, 2), (1, 3)):
                assert index.lookup(prompt, out, k, min_n) == lookup(prompt + out, k, min_n), (trial, end, k)
    big = NgramIndex()
    assert big.lookup([2**31 + 5, 7, 2**31 + 5], [], 3) == [7, 2**31 + 5]  # large ids do not collide
    from millis.gen.speculate import INDEX_PER_STEP

    long = [1, 2, 3] * (INDEX_PER_STEP // 3) + [9] * INDEX_PER_STEP + [1, 2]  # a prompt past a step's indexing
    index, calls = NgramIndex(), 0
    while not (got := index.lookup(long, [], 4, 1)):
        calls += 1
    assert calls == 1 and got == lookup(long, 4, 1) == [3, 9, 9, 9]  # no draft until it is all in, then the same


@pytest.fixture(scope="module")
def shared_stories():
    from conftest import shared_model

    return str(shared_model("stories260K") / "stories260K.bin")


def test_speculate_on_a_torch_model_is_refused(shared_stories):
    """stories260K at bf16 runs as a torch model without paged KV: speculate did nothing, silently."""
    from millis.common.errors import MillisError

    with pytest.raises(MillisError, match="speculate"):
        open_engine(shared_stories, EngineConfig(max_batch=1, dtype="bf16", speculate=4))


def test_a_failing_draft_model_is_counted_and_the_text_is_the_targets(model_path, caplog):
    """The draft model raising gives no drafts that step: the target's plain text, the failures counted and
    logged (the engine's catch-all dropped them unseen)."""
    prompts = [[1] + [10 + (i % 23) for i in range(40)], [1, 40, 41, 42]]
    greedy = SamplingParams(max_tokens=12, ignore_eos=True)
    want = run_all(open_engine(model_path, EngineConfig(max_batch=2, max_seq=256, threads=2)), prompts, greedy)
    eng = open_engine(model_path, EngineConfig(max_batch=2, max_seq=256, threads=2, speculate=3,
                                               draft_model=model_path))

    def broken(rows):
        raise RuntimeError("draft kernel fault")
    eng.drafter.drafts = broken
    with caplog.at_level("WARNING", logger="millis.gen"):
        assert run_all(eng, prompts, greedy) == want
    assert eng.drafter.failures >= 10 and eng.draft_stats.drafted == 0
    assert "draft kernel fault" in caplog.text
