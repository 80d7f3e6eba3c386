"""Generation ends at every id the model says ends it, as HF generate and llama.cpp end it: an eos_token_id
list (config.json, generation_config.json), and in a GGUF the eot / eom ids and control tokens spelled as an
end of turn (`<|im_end|>`, `<|eot_id|>`, ...). Only the first EOS id was honoured: Llama 3 Instruct's replies ran
past `<|eot_id|>` into a new turn until max_tokens."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from test_serve_gen import build_llama

from millis.gen import EngineConfig, SamplingParams, open_engine
from millis.gen.gguf import end_of_generation_ids
from millis.gen.gguf_tokenizer import CONTROL, NORMAL

PROMPT = [0, 5, 6, 7]


def greedy(d: Path, n: int = 8) -> tuple[list[int], str | None]:
    eng = open_engine(str(d), EngineConfig(max_batch=1, threads=1))
    eng.add(PROMPT, SamplingParams(max_tokens=n))
    ids, fin = [], None
    while eng.has_work:
        for o in eng.step():
            ids, fin = ids + o.token_ids, o.finished or fin
    return ids, fin


def test_an_eos_list_ends_generation_as_hf_generate_ends_it(tmp_path):
    from transformers import AutoModelForCausalLM

    d = build_llama(tmp_path / "m", None)
    free, _ = greedy(d)
    stop = free[2]  # the third greedy token: now one of the EOS ids
    assert stop not in free[:2]
    for where in ("config.json", "generation_config.json"):
        cfg = json.loads((d / "config.json").read_text())
        cfg["eos_token_id"] = [1, stop] if where == "config.json" else 1
        (d / "config.json").write_text(json.dumps(cfg))
        (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, stop]}))
        if where == "config.json":
            (d / "generation_config.json").unlink()
        hf = AutoModelForCausalLM.from_pretrained(d).eval()
        want = hf.generate(torch.tensor([PROMPT]), max_new_tokens=8, do_sample=False)[0, len(PROMPT):].tolist()
        got, fin = greedy(d)
        assert got == want == free[:3] and fin == "stop", (where, got, want)


def test_gguf_end_of_turn_tokens_end_generation():
    tokens = ["<unk>", "<s>", "</s>", "<|im_end|>", "<|im_end|>x", "<|eot_id|>", "hello", "<|endoftext|>"]
    types = [CONTROL, CONTROL, CONTROL, CONTROL, CONTROL, NORMAL, NORMAL, CONTROL]
    meta = {"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.eot_token_id": 6}
    # control tokens spelled as an end of turn, the eot id; not a normal token that spells one, not EOS again
    assert end_of_generation_ids(meta) == (6, 3, 7)
    assert end_of_generation_ids({"tokenizer.ggml.eos_token_id": 2}) == ()
