"""The engine's schedule (millis/gen/scheduling.py): a step prefills at most its budget of prompt tokens, long
prompts over several steps while the running rows decode a token every step, with the tokens of an
unchunked prefill; prefix-cache blocks shared as their chunks complete; the draft model's catch-up within
the same budget; and admission that lets a request that fits pass one that does not, a bounded number of
times."""
from collections import deque

import pytest
from gguf_fixtures import random_llama_tensors, write_tiny_gguf

from millis.gen import EngineConfig, SamplingParams, open_engine
from millis.gen.config import LlamaConfig
from millis.gen.engine import run_all
from millis.gen.request import Request
from millis.gen.scheduling import schedule

CFG = LlamaConfig(vocab_size=320, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq=256, hidden_dim=128,
                  norm_eps=1e-5, rope_theta=10000.0)
BUDGET = 40  # not a multiple of the KV block (32): chunks end inside blocks
LONG = [[1] + [3 + (i * k) % 300 for i in range(149)] for k in (7, 11, 13)]  # 150 tokens each, no shared block


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("sched") / "tiny.gguf")
    write_tiny_gguf(path, CFG, random_llama_tensors(CFG, "Q8_0", embed_qtype="Q8_0"))
    return path


def open_tiny(path, budget=BUDGET, **over):
    return open_engine(path, EngineConfig(**{"max_batch": 4, "max_seq": 256, "threads": 2,
                                             "prefill_tokens_per_step": budget, **over}))


def count_prompt_tokens(eng) -> list:
    """Wrap the native forward: per call, the tokens that were prompt positions of their slot's request."""
    calls, inner = [], eng.model.forward_flat

    def counted(ids, pos, slots, rows):
        calls.append(sum(int(p) < len(eng.slots[s].prompt) for p, s in zip(pos, slots)))
        return inner(ids, pos, slots, rows)

    eng.model.forward_flat = counted
    return calls


def test_long_prompts_prefill_within_the_budget_while_a_stream_decodes(model_path):
    """Three 150-token prompts join a running stream: every step prefills at most BUDGET prompt tokens, the
    stream gets its token every step, and every request's tokens are those of the unchunked engine."""
    params = SamplingParams(max_tokens=30, ignore_eos=True)
    stream = [1, 5, 6, 7]
    whole = open_tiny(model_path, budget=10_000)
    want = run_all(whole, [stream] + LONG, params)
    assert want == [run_all(whole, [p], params)[0] for p in [stream] + LONG]
    eng = open_tiny(model_path)
    calls = count_prompt_tokens(eng)
    sid = eng.add(stream, params)
    got = {sid: list(eng.step()[0].token_ids)}
    ids = [eng.add(p, params) for p in LONG]
    got.update({i: [] for i in ids})
    per_step, first_at = [], {}
    for step in range(1, 100):
        if not eng.has_work:
            break
        n = len(calls)
        outs = {o.id: o for o in eng.step()}
        per_step.append(sum(calls[n:]))
        if len(got[sid]) < params.max_tokens:
            assert len(outs[sid].token_ids) == 1, step  # the stream decodes every step
        for o in outs.values():
            first_at.setdefault(o.id, step)
            got[o.id] += o.token_ids
    assert max(per_step) == BUDGET and sum(per_step) == 3 * 150
    assert [first_at[i] for i in ids] == [4, 8, 12]  # 450 prompt tokens at 40 a step: the 4th, 8th, 12th step
    assert [got[i] for i in [sid] + ids] == want
    assert eng.kv.in_use == 0 and sum(eng.kv.pending) == 0


def test_prefix_blocks_are_shared_once_their_chunk_is_written(model_path):
    """A block is keyed for sharing as soon as every position of it is written, not before: a request whose
    prefix is written already shares it while the first prompt is still prefilling; one whose prefix is
    still to come waits for it. The tokens are those without the prefix cache."""
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    a, b, c = LONG[0], LONG[0][:70] + [9], LONG[0] + [9]
    off = open_tiny(model_path, prefix_cache=False)
    want = [run_all(off, [p], params)[0] for p in (a, b, c)]
    eng = open_tiny(model_path)
    kv = eng.kv
    eng.add([1, 2, 3], SamplingParams(max_tokens=200, ignore_eos=True))  # a row decoding: prompts go in chunks
    eng.step()
    ra = eng.add(a, params)
    r = eng.requests[ra]
    for written in (40, 80):
        eng.step()
        assert r.prefilled == written and len(kv.block_of) == written // kv.block_size
    rb, rc = eng.add(b, params), eng.add(c, params)
    got = {i: [] for i in (ra, rb, rc)}
    reqs = {i: eng.requests[i] for i in got}
    while eng.has_work:
        for o in eng.step():
            if o.id in got:
                got[o.id] += o.token_ids
        assert len(kv.block_of) == min(r.prefilled // kv.block_size, 4) or r.out
    assert reqs[rb].cached == 64  # 2 blocks written when it came: shared while a's prompt went on
    assert reqs[rc].cached == 128  # its 4th block was being written: it waited, then shared all 4
    assert [got[i] for i in (ra, rb, rc)] == want


def test_draft_model_catch_up_within_the_budget(model_path):
    """The draft model feeds new rows' prompts at most BUDGET tokens a step, all rows together, and the text
    is the target's plain greedy text."""
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    story = [1] + [10 + (i % 23) for i in range(40)]
    prompts = [story, LONG[1], LONG[2]]
    want = run_all(open_tiny(model_path), prompts, params)
    eng = open_tiny(model_path, speculate=4, draft_model=model_path)
    d, fed, inner = eng.drafter, [], eng.drafter.propose

    def propose(rows):
        before = dict(d.done)
        out = inner(rows)
        fed.append(sum(n - before.get(s, 0) for s, n in d.done.items()))
        return out

    d.propose = propose
    assert run_all(eng, prompts, params) == want
    assert max(fed) == BUDGET and eng.draft_stats.accepted > 0


def test_chunked_prefill_on_the_torch_model_and_its_graph_stand_ins(monkeypatch):
    """The torch model prefills a prompt past the budget in chunks (later ones masked from their start); with
    the CUDA-graph stand-ins (capture=False: static decode with slot compaction, graphed whole prompts) the
    tokens are the unchunked engine's, and only whole prompts within the budget take the prefill graph,
    whose buckets stop at the budget (on cuda by default the largest bucket)."""
    from millis.gen import cuda_prefill
    from millis.gen.config import PREFILL_TOKENS
    from millis.gen.cuda_graph import GraphedDecode
    from millis.gen.cuda_prefill import GraphedPrefill
    from test_gen_engine import GREEDY, engine, run

    assert EngineConfig(device="cuda").prefill_tokens == PREFILL_TOKENS["cuda"] == cuda_prefill.LARGEST
    monkeypatch.setattr(cuda_prefill, "GraphedPrefill", lambda model, max_seq, buckets: buckets)
    assert cuda_prefill.open_prefill(None, 4096, 300) == (64, 128, 256)
    assert cuda_prefill.open_prefill(None, 4096) == (64, 128, 256, 512, 1024, 2048)

    prompts = ["in a he", "a", "the cat in a hat then the end", "he the an the cat in a bat and a ant"]  # 7, 3, 21, 27
    want = [r["ids"] for r in run(engine(runtime="torch"), prompts, GREEDY)]
    eng = engine(runtime="torch")
    eng.prefill_tokens = 6
    assert [r["ids"] for r in run(eng, prompts, GREEDY)] == want
    eng = engine(runtime="torch")
    eng.prefill_tokens, eng.max_prefills = 10, 1  # a lone whole prompt a step: the graphed path
    eng.decode = GraphedDecode(eng.model, eng.max_batch, eng.max_seq, capture=False, buckets=(1, 2))
    gp, served = GraphedPrefill(eng.model, eng.max_seq, capture=False, buckets=(4, 8, 16, 32)), []
    eng.prefill = lambda prompt, slot: served.append(len(prompt)) or gp(prompt, slot)
    assert [r["ids"] for r in run(eng, prompts, GREEDY)] == want
    assert served == [7, 3]  # the longer prompts came in chunks, past position 0: eagerly


def waiting_requests(n: int) -> deque:
    return deque(Request(f"r{i}", [1, 2, 3], SamplingParams(), 0) for i in range(n))


def test_a_request_that_fits_passes_a_blocked_head_at_most_max_passes_times():
    """The scheduling policy alone: the head cannot start; later requests pass it, each pass counted on it,
    until it has been passed max_passes times; then nothing starts until it does."""
    slots, waiting = [None] * 8, waiting_requests(6)
    head = waiting[0]
    head_fits = False

    def start(r):
        if r is head and not head_fits:
            return False
        r.slot = slots.index(None)
        slots[r.slot] = r
        return True

    chunks = schedule(slots, waiting, budget=100, max_new=2, max_passes=3, start=start)
    assert [c.r.id for c in chunks] == ["r1", "r2"] and head.passed == 2  # max_new a step
    chunks = schedule(slots, waiting, budget=100, max_new=2, max_passes=3, start=start)
    assert [c.r.id for c in chunks] == ["r1", "r2", "r3"] and head.passed == 3  # r1, r2 continue (budget)
    for r in slots:
        if r is not None:
            r.prefilled = len(r.prompt)
    assert schedule(slots, waiting, budget=100, max_new=2, max_passes=3, start=start) == []  # aged: nothing passes
    assert [r.id for r in waiting] == ["r0", "r4", "r5"]
    head_fits = True
    chunks = schedule(slots, waiting, budget=100, max_new=2, max_passes=3, start=start)
    assert [c.r.id for c in chunks] == ["r0", "r4"] and waiting[0].passed == 0


def test_kv_blocks_are_taken_as_positions_are_written_and_the_newest_request_is_preempted(model_path):
    """Two long requests (210 positions each) and four short ones on a pool of 320 positions: every request
    starts at once (a promise of its whole max_tokens made the second long one, and the short ones behind it,
    wait for the first's 200 tokens); when the two long ones fill the pool, the newer gives its blocks back,
    waits first in line, and when the older ends it is prefilled again (prompt and output so far) and goes on:
    every request's tokens are the ones it gets alone, and no block is left behind."""
    eng = open_tiny(model_path, budget=256, max_batch=4)
    eng.kv.n_blocks, eng.kv.free = 10, list(range(9, -1, -1))  # 320 positions in all
    long = SamplingParams(max_tokens=200, ignore_eos=True)  # 210 positions: 7 of the 10 blocks
    short = SamplingParams(max_tokens=5, ignore_eos=True)   # 1 block
    prompts = [([1] + [5] * 9, long), ([1] + [6] * 9, long)] + [([1, 7, i], short) for i in (8, 9, 10, 11)]
    alone = []
    for prompt, params in prompts:
        ref = open_tiny(model_path, budget=256, max_batch=4)
        rid = ref.add(prompt, params)
        toks = []
        while ref.has_work:
            toks += [t for o in ref.step() if o.id == rid for t in o.token_ids]
        alone.append(toks)
    a = eng.add(*prompts[0])
    got, first = {a: [t for o in eng.step() for t in o.token_ids]}, {a: 1}
    ids = [a] + [eng.add(*pp) for pp in prompts[1:]]
    got.update({i: [] for i in ids[1:]})
    step = 1
    while eng.has_work:
        step += 1
        for o in eng.step():
            got[o.id] += o.token_ids
            first.setdefault(o.id, step)
    assert [got[i] for i in ids] == alone
    # the second long one and two short ones start at once (four slots), the other two as the first two short
    # ones end: nobody waited for a's 200 tokens
    assert [first[i] for i in ids[1:4]] == [2, 2, 2] and all(first[i] <= 2 + 6 for i in ids[4:]), first
    assert eng.preempted >= 1 and eng.kv.in_use == 0 and sum(eng.kv.pending) == 0


def alone_tokens(model_path, prompt, params, **over) -> list[int]:
    ref = open_tiny(model_path, budget=256, **over)
    rid, toks = ref.add(prompt, params), []
    while ref.has_work:
        toks += [t for o in ref.step() if o.id == rid for t in o.token_ids]
    return toks


@pytest.mark.parametrize("speculate", [0, 3])
def test_preempted_sampled_penalized_and_drafted_requests_go_on_as_alone(model_path, speculate):
    """A pool of 192 positions, three requests of up to 150 each: seeded sampling with presence / frequency and
    repetition penalties (the returning request's counts are its output's), greedy with prompt-lookup drafts.
    Preempted and prefilled again, each request's tokens are the ones it draws alone."""
    rep = [1] + [5, 6, 7, 8] * 10
    asks = [(rep, SamplingParams(max_tokens=140, ignore_eos=True)),
            ([1, 9, 9, 4], SamplingParams(max_tokens=140, temperature=1.0, seed=3, frequency_penalty=0.8,
                                          presence_penalty=0.3, ignore_eos=True)),
            ([1, 2, 3], SamplingParams(max_tokens=140, temperature=0.8, top_p=0.9, repetition_penalty=1.3, seed=4,
                                       ignore_eos=True))]
    want = [alone_tokens(model_path, p, sp, speculate=speculate) for p, sp in asks]
    eng = open_tiny(model_path, budget=256, speculate=speculate)
    eng.kv.n_blocks, eng.kv.free = 6, list(range(5, -1, -1))
    ids = [eng.add(p, sp) for p, sp in asks]
    got = {i: [] for i in ids}
    while eng.has_work:
        for o in eng.step():
            assert o.finished != "error", o.error
            got[o.id] += o.token_ids
    assert [got[i] for i in ids] == want
    assert eng.preempted >= 2 and eng.kv.in_use == 0 and sum(eng.kv.pending) == 0
    assert eng.kv.prompt_tokens == sum(len(p) for p, _ in asks)  # a returning request's feed is no new prompt


def test_generate_waits_out_the_steps_of_a_chunked_prompt(model_path, monkeypatch):
    """`millis generate` (one prompt through the engine): a lone prompt goes whole even under a small budget
    (no row decodes, none to stall), so its text and timing are the unchunked ones."""
    from millis.gen import GenerateConfig, config, generate

    cfg = GenerateConfig(model=model_path, prompt="the cat sat on the mat and then the dog sat on it " * 3,
                         max_tokens=6, threads=2)
    whole = generate(cfg)
    monkeypatch.setitem(config.PREFILL_TOKENS, "cpu", 8)
    chunked = generate(cfg)
    assert len(chunked.prompt_ids) > 3 * 8 and chunked.token_ids == whole.token_ids and len(whole.token_ids) == 6
    assert chunked.text == whole.text and chunked.prefill_ms > 0


def test_the_budget_holds_with_no_row_decoding(model_path):
    """A step prefills at most the budget even when no row decodes (a lone prompt went whole: on an idle server an
    8k-token prompt was one step of 100 s, which requests behind it and its own cancel waited out); a cancelled
    prompt costs no step after its cancel, and the request behind it starts in the next step."""
    eng = open_tiny(model_path)
    calls = count_prompt_tokens(eng)
    rid = eng.add(LONG[0], SamplingParams(max_tokens=4, ignore_eos=True))
    eng.step()
    assert calls == [BUDGET]
    short = eng.add("the cat", SamplingParams(max_tokens=2, ignore_eos=True))
    eng.cancel(rid)
    n = len(calls)
    outs = eng.step()
    assert sum(calls[n:]) < BUDGET and [o.id for o in outs] == [short], (calls[n:], outs)


def test_generate_without_a_seed_draws_anew_each_run(model_path):
    """`millis generate --seed -1` ("random") sampled the same text every run (the engine's stream seeded 0); a
    seed given still repeats its text."""
    from millis.gen import GenerateConfig, generate

    cfg = GenerateConfig(model=model_path, prompt="the cat", max_tokens=12, temperature=1.0, threads=1)
    runs = {tuple(generate(cfg).token_ids) for _ in range(3)}
    assert len(runs) >= 2, runs
    seeded = GenerateConfig(model=model_path, prompt="the cat", max_tokens=12, temperature=1.0, threads=1, seed=7)
    assert generate(seeded).token_ids == generate(seeded).token_ids


def slot_starter(slots):
    def start(r):
        r.slot = slots.index(None)
        slots[r.slot] = r
        return True
    return start


def test_a_short_prompt_starts_beside_a_long_one_part_way():
    """The scheduling policy alone: while a request waits, a part-way prompt takes at most half the budget and
    a waiting prompt that fits the other half starts now (it waited for the whole long prefill before); a
    longer one waits as before, passed and counted; what the new prompts leave goes back to the long one."""
    slots = [None] * 4
    start = slot_starter(slots)
    long = Request("long", list(range(1, 301)), SamplingParams(), 0)
    start(long)
    long.prefilled = 40
    mid = Request("mid", list(range(1, 31)), SamplingParams(), 0)  # 30 tokens: over the half of 40
    short = Request("short", [1, 2, 3, 4, 5], SamplingParams(), 0)
    waiting = deque([mid, short])
    chunks = schedule(slots, waiting, budget=40, max_new=4, max_passes=3, start=start)
    assert [(c.r.id, c.start, c.end) for c in chunks] == [("long", 40, 75), ("short", 0, 5)]
    assert list(waiting) == [mid] and mid.passed == 1 and short.prefilled == 0
    short.prefilled, long.prefilled = 5, 75  # (the engine's update)
    chunks = schedule(slots, waiting, budget=40, max_new=4, max_passes=3, start=start)
    assert [(c.r.id, c.start, c.end) for c in chunks] == [("long", 75, 115)]  # mid cannot finish in 20: waits
    long.prefilled = 280  # the long one ends within its half: the rest of the budget starts mid whole or part-way
    chunks = schedule(slots, waiting, budget=40, max_new=4, max_passes=3, start=start)
    assert [(c.r.id, c.start, c.end) for c in chunks] == [("long", 280, 300), ("mid", 0, 20)] and not waiting
    full = [Request(f"f{i}", [1], SamplingParams(), 0) for i in range(4)]
    long.prefilled, slots[:] = 40, [long] + full[:3]  # no free slot: the long prompt takes the whole budget
    assert [(c.r.id, c.end) for c in schedule(slots, deque(full[3:]), 40, 4, 3, start)] == [("long", 80)]


def test_a_short_request_behind_a_long_prompt_gets_its_first_token_next_step(model_path):
    """The engine: a short request added while a 150-token prompt is part-way gets its first token from the
    next step (it waited for the whole prompt before: 3 steps at this budget); both requests' tokens are the
    unchunked engine's, and the long prompt's first token comes in the step it came in before."""
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    short_prompt = [1, 9, 8, 7, 6]
    want = run_all(open_tiny(model_path, budget=10_000), [LONG[0], short_prompt], params)
    eng = open_tiny(model_path)
    calls = count_prompt_tokens(eng)
    lid = eng.add(LONG[0], params)
    eng.step()
    sid = eng.add(short_prompt, params)
    got, first_at = {lid: [], sid: []}, {}
    for step in range(2, 40):
        if not eng.has_work:
            break
        n = len(calls)
        for o in eng.step():
            first_at.setdefault(o.id, step)
            got[o.id] += o.token_ids
        assert sum(calls[n:]) <= BUDGET
    assert first_at == {sid: 2, lid: 4}
    assert [got[lid], got[sid]] == want


def test_a_long_waiting_prompt_keeps_its_slot_and_the_budget_is_not_left_unused():
    """(A review's two finds.) A waiting prompt too long for the half budget keeps a free slot for itself: a short
    one behind it does not take the last free slot (then the long one waited for a whole request to end: its first
    token at step 106 against 7 before); and when what the new prompts leave ends the part-way prompt, the rest of
    the budget starts the next in line part-way, as before (it was left unused: a queue of long prompts drained
    ~4% slower)."""
    slots = [None] * 2
    start = slot_starter(slots)
    part = Request("part", list(range(1, 151)), SamplingParams(), 0)
    start(part)
    part.prefilled = 40
    wait, short = Request("wait", list(range(1, 121)), SamplingParams(), 0), Request("s", [1, 2], SamplingParams(), 0)
    waiting = deque([wait, short])
    chunks = schedule(slots, waiting, budget=40, max_new=4, max_passes=3, start=start)
    assert [(c.r.id, c.start, c.end) for c in chunks] == [("part", 40, 80)] and list(waiting) == [wait, short]
    slots[1:] = [None, None]  # a second free slot: the short one may take it
    chunks = schedule(slots, waiting, budget=40, max_new=4, max_passes=3, start=start)
    assert [(c.r.id, c.start, c.end) for c in chunks] == [("part", 40, 78), ("s", 0, 2)] and list(waiting) == [wait]
    slots[:] = [part, None]
    part.prefilled, waiting = 1, deque([Request("w2", list(range(1, 521)), SamplingParams(), 0)])
    part.prompt = list(range(1, 201))  # 199 left of a 256 budget: more than the half, less than the whole
    chunks = schedule(slots, waiting, budget=256, max_new=4, max_passes=3, start=start)
    assert [(c.r.id, c.start, c.end) for c in chunks] == [("part", 1, 200), ("w2", 0, 57)]


def test_a_request_mostly_in_the_prefix_cache_counts_what_it_would_prefill(model_path):
    """A chat turn behind a long system prompt the cache holds needs only its new tokens: it starts beside a long
    prompt part-way (judged by its whole feed it waited for that prompt's prefill), with the tokens it gets alone."""
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    system = LONG[1][:96]  # 3 whole blocks
    turn1, turn2 = system + [5, 6, 7], system + [8, 9, 10, 11]
    want = run_all(open_tiny(model_path, prefix_cache=False), [turn2], params)[0]
    eng = open_tiny(model_path)
    run_all(eng, [turn1], params)  # the system prompt's blocks cached
    eng.add(LONG[0], params)
    eng.step()  # the long prompt part-way: 40 of its 150
    rid = eng.add(turn2, params)
    got, first = [], None
    for step in range(1, 20):
        for o in eng.step():
            if o.id == rid:
                got += o.token_ids
                first = first or step
    assert first == 1 and eng.requests.get(rid) is None and got == want
    assert not eng.has_work
