"""Speculation and capacity: the target's paged KV is promised for a draft only when a row has one (after the
step's admissions, never past what the pool can give: a draft is cut to its slot's promise), and a row whose
drafting switches off gives its draft-model cache back at once to rows that can draft. Greedy text stays the
text of plain decoding in every case."""
from dataclasses import replace

import pytest
from gguf_fixtures import random_llama_tensors, write_tiny_gguf

from millis.gen import EngineConfig, SamplingParams, open_engine
from millis.gen.config import LlamaConfig
from millis.gen.engine import run_all
from millis.gen.models.paged_kv import PagedKV
from millis.gen.request import Request
from millis.gen.speculate import row_drafts

CFG = LlamaConfig(vocab_size=320, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq=256, hidden_dim=128,
                  norm_eps=1e-5, rope_theta=10000.0)
SMALL = LlamaConfig(**{**CFG.__dict__, "dim": 32, "hidden_dim": 64, "n_layers": 1})


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    d = tmp_path_factory.mktemp("spec_capacity")
    paths = {k: str(d / f"{k}.gguf") for k in ("target", "other", "ctx64")}
    write_tiny_gguf(paths["target"], CFG, random_llama_tensors(CFG, "Q4_0", embed_qtype="Q8_0"))
    write_tiny_gguf(paths["other"], SMALL, random_llama_tensors(SMALL, "Q8_0", seed=5))  # drafts mostly wrong
    write_tiny_gguf(paths["ctx64"], replace(CFG, max_seq=64), random_llama_tensors(CFG, "Q4_0", embed_qtype="Q8_0"))
    return paths


def engine(models, n_blocks=0, **over):
    eng = open_engine(models["target"], EngineConfig(**{"max_batch": 4, "max_seq": 256, "threads": 2, **over}))
    if n_blocks:  # a small pool (the buffers stay; the free list and the admission arithmetic see n_blocks)
        eng.kv.n_blocks, eng.kv.free = n_blocks, list(range(n_blocks - 1, -1, -1))
    return eng


def no_repeats(n: int, seed: int) -> list[int]:
    import random

    r = random.Random(seed)
    return [1] + [3 + r.randrange(300) for _ in range(n - 1)]


def drive(eng, asks, every: int = 1, check=None) -> dict:
    """Add asks[i] before step i * every + 1; step until done. Each request's tokens, the step of its first
    token, the most requests holding a slot at once, preemptions; `check(eng)` after every step."""
    pending, ids, got, first, step, peak = list(asks), [], {}, {}, 0, 0
    while pending or eng.has_work:
        if pending and step % every == 0:
            ids.append(eng.add(*pending.pop(0)))
            got[ids[-1]] = []
        step += 1
        for o in eng.step():
            assert o.finished != "error", o.error
            got[o.id] += o.token_ids
            first.setdefault(o.id, step)
        peak = max(peak, sum(s is not None for s in eng.slots))
        if check is not None:
            check(eng)
    return dict(tokens=[got[i] for i in ids], first=[first[i] for i in ids], peak=peak, preempted=eng.preempted)


def writes_within_promise(eng) -> list:
    """Wrap the pool's `ensure` (every forward takes its slots' blocks through it): the writes past their promise."""
    kv, inner, past = eng.kv, eng.kv.ensure, []

    def ensure(slot, n_pos):
        if kv.blocks(n_pos) > len(kv.owned[slot]) + kv.pending[slot]:
            past.append((slot, n_pos, kv.promised(slot)))
        inner(slot, n_pos)
    kv.ensure = ensure
    return past


def test_rows_without_a_draft_promise_no_kv_for_drafts(models):
    """Rows that never draft (the draft model's context of 64 holds none of these 190-position requests, so
    none is ever verified or switched off) were promised speculate + 1 positions past their length every step:
    at speculate 40 up to 3 blocks of a 12-block pool, and the fifth request started at step 241 instead of 151
    (two rows at once instead of three). Now the schedule is the one without speculation, step for step."""
    asks = [(no_repeats(70, 100 + s), SamplingParams(max_tokens=120, ignore_eos=True)) for s in range(6)]
    plain = drive(engine(models, 12), asks, every=30)
    ahead = []

    def no_promise_ahead(eng):  # blocks promised past admission's (feed + a block) and past what is written
        ahead.append(max([eng.kv.blocks(eng.kv.promised(r.slot)) - eng.kv.blocks(max(len(r.feed) + 32, len(r.prompt)
                          + len(r.out))) for r in eng.slots if r is not None and not r.prefilling] or [0]))
    spec = drive(engine(models, 12, speculate=40, draft_model=models["ctx64"]), asks, every=30, check=no_promise_ahead)
    assert spec == plain and plain["first"][4] == 151 and plain["peak"] == 3, (plain, spec)
    assert max(ahead) == 0


def test_drafts_take_kv_after_admission_and_only_within_their_promise(models):
    """Prompt-lookup drafts on a 10-block pool (repeating prompts: drafts are accepted). A draft's positions
    were promised ahead of the step's admission (speculate 40: 41 positions a row while drafts were 2 tokens
    long), and the fourth request started at step 69 instead of 7; now each starts at the step it starts
    without speculation, the text is the same, and no forward writes a position outside its slot's promise."""
    asks = [([1] + [10 + (i % (5 + s)) for i in range(30)], SamplingParams(max_tokens=90, ignore_eos=True))
            for s in range(4)]
    plain = drive(engine(models, 10), asks, every=2)
    eng = engine(models, 10, speculate=40)
    past = writes_within_promise(eng)
    spec = drive(eng, asks, every=2)
    assert spec["tokens"] == plain["tokens"] and spec["first"] == plain["first"] == [1, 3, 5, 7], (plain, spec)
    assert eng.draft_stats.accepted > 0 and past == []
    assert eng.kv.in_use == 0 and sum(eng.kv.pending) == 0 and len(eng.kv.free) + len(eng.kv.idle) == 10


def test_a_pool_sized_for_n_requests_admits_n_with_speculation(models):
    """Four requests of 128 positions on a pool of exactly 4 x 4 blocks, admitted one a step: all four run
    at once with and without drafts, none preempted (admission promised nothing for drafts before either;
    kept as a guard)."""
    asks = [(no_repeats(20, s), SamplingParams(max_tokens=108, ignore_eos=True)) for s in range(4)]
    plain = drive(engine(models, 16, max_prefills_per_step=1), asks, every=1)
    for over in (dict(speculate=4), dict(speculate=40), dict(speculate=4, draft_model=models["target"])):
        eng = engine(models, 16, max_prefills_per_step=1, **over)
        past = writes_within_promise(eng)
        spec = drive(eng, asks, every=1)
        assert spec["tokens"] == plain["tokens"] and spec["peak"] == plain["peak"] == 4, over
        assert spec["preempted"] == plain["preempted"] == 0 and past == [] and eng.draft_stats.drafted > 0, over


def test_a_draft_is_cut_to_what_the_pool_can_promise():
    """row_drafts promises a draft's positions from free blocks, and where there are none cuts the draft to
    the slot's promise (the verify then writes no KV outside it)."""
    class Drafter:
        def propose(self, rows):
            return [[7] * k for *_, k in rows]

        def release(self, slot):
            pass
    kv = PagedKV(n_blocks=3, block_size=4, max_slots=2, max_seq=32, prefix_cache=False)
    r = Request("a", [1, 2, 3, 4, 5], SamplingParams(max_tokens=20), 0, slot=0, out=[6])  # length 6, written 5
    assert kv.reserve(0, 8) and kv.reserve(1, 4)  # slot 0: 2 blocks (8 positions); slot 1 holds the third
    [(_, d)] = row_drafts([r], {}, kv, Drafter(), 5, lambda q: 26)
    assert d == [7, 7] and kv.promised(0) == 8  # positions 5 .. 7: the last token and 2 draft tokens
    kv.release(1)
    [(_, d)] = row_drafts([r], {}, kv, Drafter(), 5, lambda q: 26)
    assert d == [7] * 5 and kv.promised(0) == 12  # the free block promised for it: 11 positions written
    kv.release(0)
    assert kv.reserve(0, 8)
    [(_, d)] = row_drafts([r], {}, kv, Drafter(), 5, lambda q: 9)  # its limit: 9 positions, 2 tokens to go
    assert d == [7, 7] and kv.promised(0) == 8  # then the verify's own token is the 9th: nothing promised for it


def test_a_released_draft_slot_gives_its_blocks_back_once_and_a_waiting_slot_takes_them(models):
    eng = engine(models, speculate=3, draft_model=models["target"])
    d = eng.drafter
    d.kv.n_blocks, d.kv.free = 4, [3, 2, 1, 0]
    assert d.admit(0, 100) and not d.admit(1, 100) and d.waiting == {1: 100}  # 4 blocks each: one fits
    story = [1] + [10 + (i % 23) for i in range(40)]
    assert d.propose([(story, [11], 0, 0), (story, [11], 1, 2)]) == [[], []]  # slot 1: no draft cache
    d.release(0)
    d.release(0)  # again (as at its request's end): nothing more given back
    assert sum(d.kv.pending) == 0 and len(d.kv.free) == 4 and 0 not in d.done
    got = d.propose([(story, [11], 0, 2), (story, [11], 1, 2)])
    assert got[0] == [] and len(got[1]) == 2 and d.done == {1: 42} and d.waiting == {}
    d.release(1)
    d.release(1)
    assert d.done == {} and d.kv.in_use == 0 and sum(d.kv.pending) == 0 and len(d.kv.free) == 4
    # a slot waiting since before takes blocks given back ahead of a newcomer admitted before the next proposal
    assert d.admit(0, 100) and not d.admit(1, 100)
    d.release(0)
    assert not d.admit(2, 100) and d.done == {1: 0} and d.waiting == {2: 100}


@pytest.mark.parametrize("late", [False, True])
def test_a_row_whose_drafting_switches_off_gives_its_draft_cache_to_a_row_that_drafts(models, late):
    """A draft cache of 4 blocks holds one request. A's drafts (a different random model's) are rejected and its
    drafting switches off after 4 verifies: its draft cache goes back at once, and B (waiting for one since its
    admission, or arriving later) gets it and drafts while A still runs. Before, A held it until it ended
    and B never drafted. The text is the target's plain greedy text; every block comes back once."""
    story, other = [1] + [10 + (i % 23) for i in range(40)], [1] + [100 + (i % 17) for i in range(30)]
    greedy = SamplingParams(max_tokens=60, ignore_eos=True)
    want = run_all(engine(models, max_batch=2), [story, other], greedy)
    eng = engine(models, max_batch=2, speculate=3, draft_model=models["other"])
    d = eng.drafter
    d.kv.n_blocks, d.kv.free = 4, [3, 2, 1, 0]
    a = eng.add(story, greedy)
    ra, got = eng.requests[a], {a: []}
    b = rb = None
    b_drafted_beside_a, off_for = False, 0
    while eng.has_work:
        if b is None and (not late or ra.drafts.off):
            b = eng.add(other, greedy)
            rb, got[b] = eng.requests[b], []
        for o in eng.step():
            got[o.id] += o.token_ids
        off_for += ra.drafts.off  # steps since A's drafting switched off (the step after, row_drafts releases it)
        if off_for > 1 and eng.requests.get(a) is ra:
            assert ra.slot not in d.done and ra.slot not in d.waiting
        b_drafted_beside_a |= rb is not None and rb.drafts.verifies > 0 and eng.requests.get(a) is ra
    assert ra.drafts.off and ra.drafts.verifies == 4 and b_drafted_beside_a
    assert [got[a], got[b]] == want
    assert d.done == {} and d.waiting == {} and d.kv.in_use == 0 and sum(d.kv.pending) == 0 and len(d.kv.free) == 4
