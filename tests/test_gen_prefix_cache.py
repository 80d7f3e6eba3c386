"""Prefix caching (millis/gen/models/paged_kv.py): requests whose prompts share leading blocks share
those blocks' KV instead of prefilling them again. Greedy output is identical with and without the
cache, alone and batched; hits are counted; a prompt's partial last block and everything generated
stay private; idle cached blocks are evicted when the pool needs them; the bookkeeping ends clean."""
import pytest
from gguf_fixtures import random_llama_tensors, write_tiny_gguf

from millis.gen import EngineConfig, SamplingParams, open_engine
from millis.gen.config import LlamaConfig
from millis.gen.engine import run_all
from millis.gen.models.paged_kv import PagedKV

CFG = LlamaConfig(vocab_size=320, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq=256, hidden_dim=128,
                  norm_eps=1e-5, rope_theta=10000.0)
GREEDY = SamplingParams(max_tokens=10, ignore_eos=True)
SYSTEM = [1] + [3 + (i * 7) % 300 for i in range(100)]  # 101 tokens: 3 whole blocks of 32, and 5 more


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("prefix") / "tiny.gguf")
    write_tiny_gguf(path, CFG, random_llama_tensors(CFG, "Q8_0", embed_qtype="Q8_0"))
    return path


def test_greedy_identical_with_and_without_the_prefix_cache(model_path):
    prompts = [SYSTEM + [11, 12], SYSTEM + [13], SYSTEM + [14, 15, 16], SYSTEM[:40] + [17], SYSTEM[:64]]
    off = open_engine(model_path, EngineConfig(max_batch=2, max_seq=160, threads=2, prefix_cache=False))
    on = open_engine(model_path, EngineConfig(max_batch=2, max_seq=160, threads=2))
    want = [run_all(off, [p], GREEDY)[0] for p in prompts]
    assert [run_all(on, [p], GREEDY)[0] for p in prompts] == want
    # the first prompt finds nothing; the next two share 3 blocks (96 positions), SYSTEM[:40] + [17] one;
    # SYSTEM[:64] holds exactly 2 blocks but shares only 1: its last token's logits are computed
    assert on.kv.hit_tokens == 96 + 96 + 32 + 32 and on.kv.prompt_tokens == sum(map(len, prompts))
    assert off.kv.hit_tokens == 0 and 0 < on.kv.hit_rate < 1
    assert run_all(on, prompts, GREEDY) == want  # batched: requests share blocks while others decode
    kv = on.kv
    assert kv.in_use == 0 and sum(kv.pending) == 0 and len(kv.free) + len(kv.idle) == kv.n_blocks


def test_blocks_are_shared_counted_and_evicted():
    kv = PagedKV(n_blocks=4, block_size=4, max_slots=3, max_seq=32)
    p = list(range(10))  # 2 whole blocks and 2 tokens
    assert kv.admit(0, 12, p) == 0  # nothing cached yet: 3 blocks promised
    kv.ensure(0, 12)
    kv.register(0, kv.keys(p))
    assert kv.admit(1, 12, p) == 8  # the 2 whole blocks shared, 1 new one promised
    assert list(kv.table[1, :2]) == list(kv.table[0, :2]) and kv.refs[kv.table[0, 0]] == 2
    assert kv.admit(2, 8, [50, 51, 52, 53, 54]) is None  # 3 blocks in use + 1 promised + 2 > 4
    kv.ensure(1, 12)
    assert kv.table[1, 2] != kv.table[0, 2] and kv.in_use == 4  # the partial block is each slot's own
    kv.release(0)
    kv.release(1)
    assert kv.in_use == 0 and len(kv.idle) == 2 and len(kv.free) == 2  # keyed blocks stay cached, idle
    assert kv.admit(0, 12, p) == 8 and kv.admit(0, 12, p) == 0  # a slot shares only while it holds nothing
    kv.release(0)
    assert kv.admit(2, 16, [60] * 16) == 0  # the whole pool: 2 free blocks and the 2 idle ones, evicted
    kv.ensure(2, 16)
    assert not kv.idle and not kv.block_of and not kv.key_of and kv.admit(0, 12, p) is None
    kv.release(2)
    off = PagedKV(n_blocks=4, block_size=4, max_slots=2, max_seq=32, prefix_cache=False)
    assert off.admit(0, 12, p) == 0
    off.ensure(0, 12)
    off.register(0, off.keys(p))
    assert off.admit(1, 4, p) == 0 and not off.block_of


def test_requests_arriving_together_share_the_prefix_one_of_them_prefills(model_path):
    """n choices of one prompt (or one system prompt sent at once by many clients): the first prefills the
    shared blocks, the others wait one step and take them from the cache; the tokens do not change."""
    off = open_engine(model_path, EngineConfig(max_batch=4, max_seq=160, threads=2, prefix_cache=False))
    on = open_engine(model_path, EngineConfig(max_batch=4, max_seq=160, threads=2))
    prompts = [SYSTEM + [11], SYSTEM + [11], SYSTEM + [12, 13], SYSTEM[:70]]
    assert run_all(on, prompts, GREEDY) == run_all(off, prompts, GREEDY)
    assert on.kv.hit_tokens == 3 * 96 - 32  # SYSTEM[:70] holds 2 whole blocks and shares both, the others 3
