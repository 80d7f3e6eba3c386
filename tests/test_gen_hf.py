"""Greedy tokens equal HF transformers `generate` (fp32) for tiny random Llama (GQA, tied and untied
head, llama3 RoPE scaling), Mistral (sliding window), Qwen2 (q/k/v biases) and GPT-2: alone, and
as rows of different lengths in one continuous batch."""
from dataclasses import replace

import pytest
import torch

from millis.gen import EngineConfig, SamplingParams, open_engine
from millis.gen.engine import run_all

N_NEW = 12
PROMPTS = [[5, 9, 17], [3, 44, 8, 90, 12, 7, 61], [100, 2 + 99, 13, 13, 76, 55, 21, 30, 11, 4, 9, 120], [77, 6]]


def _hf_config(kind: str):
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=64, initializer_range=0.1, bos_token_id=1, eos_token_id=2)
    if kind == "llama-gqa-untied":
        return LlamaConfig(num_key_value_heads=2, tie_word_embeddings=False, **common)
    if kind == "llama-tied-llama3-rope":
        return LlamaConfig(num_key_value_heads=4, tie_word_embeddings=True, rope_parameters={
            "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}, **common)
    if kind == "mistral-window":
        return MistralConfig(num_key_value_heads=1, sliding_window=6, tie_word_embeddings=False, **common)
    if kind == "qwen2-bias":
        return Qwen2Config(num_key_value_heads=2, tie_word_embeddings=False, **common)
    return GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, initializer_range=0.1,
                      bos_token_id=1, eos_token_id=2)


KINDS = ["llama-gqa-untied", "llama-tied-llama3-rope", "mistral-window", "qwen2-bias", "gpt2"]


@pytest.fixture(scope="module", params=KINDS)
def hf_model(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(_hf_config(request.param)).eval()
    out = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(out)
    return request.param, model, out


def _hf_greedy(model, prompt: list[int], **kw) -> list[int]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=N_NEW, do_sample=False, pad_token_id=0, **kw)
    return out[0, len(prompt):].tolist()


def _run(eng, prompts, params=SamplingParams(max_tokens=N_NEW)) -> list[list[int]]:
    return run_all(eng, prompts, params)


@pytest.mark.parametrize("runtime", ["native", "torch"])
def test_logits_match_hf(hf_model, runtime, monkeypatch):
    """fp32 on the CPU runs on millis's C step (GPT-2 too); torch runs it when the kernels are off."""
    from millis.gen.models.layers import make_batch
    from millis.gen.models.native_llama import NativeLlama

    kind, model, d = hf_model
    if runtime == "torch":
        monkeypatch.setenv("MILLIS_NO_KERNELS", "1")
    eng = open_engine(str(d), EngineConfig(max_batch=1, max_seq=64))
    assert isinstance(eng.model, NativeLlama) == (runtime == "native")
    prompt = PROMPTS[2]
    with torch.inference_mode():
        ref = model(torch.tensor([prompt])).logits[0]
        ours = eng.model(make_batch([prompt], [0], [0], eng.window, last_only=False))[0]
    assert torch.allclose(ours, ref, atol=1e-4), (kind, (ours - ref).abs().max())


def test_int8_logits_close_to_hf(hf_model):
    """millis's int8 (Q8_0 weights, int16 activation blocks) on the native step, GPT-2 included: every
    position's logits within 2% of HF fp32's range, and the same top-1 token at nearly all of them."""
    from millis.gen.models.layers import make_batch
    from millis.gen.models.native_llama import INT8, TYPE_IDS, NativeLlama

    kind, model, d = hf_model
    eng = open_engine(str(d), EngineConfig(max_batch=1, max_seq=64, quant="int8"))
    assert isinstance(eng.model, NativeLlama) and eng.model.layers[0].up.type == TYPE_IDS[INT8]
    prompt = PROMPTS[2]
    with torch.inference_mode():
        ref = model(torch.tensor([prompt])).logits[0]
        ours = eng.model(make_batch([prompt], [0], [0], eng.window, last_only=False))[0]
    err = (ours - ref).abs().max() / (ref.max() - ref.min())
    assert 0 < err < 0.02, (kind, err)
    assert (ours.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9, kind


def test_greedy_alone_and_batched_match_hf(hf_model):
    kind, model, d = hf_model
    ref = [_hf_greedy(model, p) for p in PROMPTS]
    alone = open_engine(str(d), EngineConfig(max_batch=1, max_seq=64))
    assert [_run(alone, [p])[0] for p in PROMPTS] == ref, kind
    batched = open_engine(str(d), EngineConfig(max_batch=4, max_seq=64))
    assert _run(batched, PROMPTS) == ref, kind   # 4 rows of lengths 3, 7, 12, 2 decoded together
    # more requests than slots: they queue, and reuse the slots of finished ones
    small = open_engine(str(d), EngineConfig(max_batch=2, max_seq=64, max_prefills_per_step=1))
    assert _run(small, PROMPTS + PROMPTS[::-1]) == ref + ref[::-1], kind


def test_repetition_penalty_matches_hf(hf_model):
    kind, model, d = hf_model
    eng = open_engine(str(d), EngineConfig(max_batch=2, max_seq=64))
    params = SamplingParams(max_tokens=N_NEW, repetition_penalty=1.8)
    ours = _run(eng, PROMPTS[1:3], params)
    assert ours == [_hf_greedy(model, p, repetition_penalty=1.8) for p in PROMPTS[1:3]], kind


BIAS = ((5, 3.0), (17, -100.0), (40, 2.5), (127, 1.5))


def test_logit_bias_matches_hf_sequence_bias(hf_model):
    """OpenAI's logit_bias = HF's sequence_bias of one-token sequences: the same greedy tokens."""
    kind, model, d = hf_model
    eng = open_engine(str(d), EngineConfig(max_batch=2, max_seq=64))
    ours = _run(eng, PROMPTS[1:3], SamplingParams(max_tokens=N_NEW, logit_bias=BIAS))
    ref = [_hf_greedy(model, p, sequence_bias=[[[t], b] for t, b in BIAS]) for p in PROMPTS[1:3]]
    assert ours == ref, kind
    assert ref != [_hf_greedy(model, p) for p in PROMPTS[1:3]], "the bias changes the text"


def _penalized_reference(model, prompt: list[int], presence: float, frequency: float, bias=()) -> list[int]:
    """OpenAI's penalties by hand: each step a full forward of HF's model over prompt + output, the logit
    bias added, c * frequency + (c > 0) * presence off (c: the token's count in the output), the argmax."""
    out: list[int] = []
    with torch.inference_mode():
        for _ in range(N_NEW):
            logits = model(torch.tensor([prompt + out])).logits[0, -1].double()
            for t, b in bias:
                logits[t] += b
            c = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.numel()).double()
            out.append(int((logits - c * frequency - (c > 0).double() * presence).argmax()))
    return out


@pytest.mark.parametrize("presence,frequency,bias", [(1.5, 0.0, ()), (0.0, 2.0, ()), (0.8, 0.6, BIAS), (-2.0, 0.0, ())])
def test_presence_and_frequency_penalties_match_a_reference(hf_model, presence, frequency, bias):
    """Greedy rows with OpenAI's presence / frequency penalties (and a logit bias) in one continuous batch
    beside a plain row: each row's tokens equal the step-by-step reference's, the plain row HF's greedy."""
    kind, model, d = hf_model
    eng = open_engine(str(d), EngineConfig(max_batch=4, max_seq=64))
    pen = SamplingParams(max_tokens=N_NEW, ignore_eos=True, presence_penalty=presence,
                         frequency_penalty=frequency, logit_bias=bias)
    ids = [eng.add(PROMPTS[1], pen), eng.add(PROMPTS[0], SamplingParams(max_tokens=N_NEW)), eng.add(PROMPTS[2], pen)]
    got = {i: [] for i in ids}
    while eng.has_work:
        for o in eng.step():
            got[o.id] += o.token_ids
    ref = [_penalized_reference(model, p, presence, frequency, bias) for p in (PROMPTS[1], PROMPTS[2])]
    assert [got[ids[0]], got[ids[2]]] == ref, kind
    assert got[ids[1]] == _hf_greedy(model, PROMPTS[0]), kind
    plain = [_penalized_reference(model, p, 0.0, 0.0) for p in (PROMPTS[1], PROMPTS[2])]
    assert ref != plain, "the penalties change the text"


def test_cli_on_hf_dir_with_tokenizer_json(hf_model, capsys):
    """A HF directory with tokenizer.json takes text prompts (a word-level tokenizer: word i is id i)."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import WhitespaceSplit

    from millis.cli.main import main

    kind, model, d = hf_model
    tok = Tokenizer(WordLevel({f"w{i}": i for i in range(128)}, unk_token="w0"))
    tok.pre_tokenizer = WhitespaceSplit()
    tok.save(str(d / "tokenizer.json"))
    ref = _hf_greedy(model, PROMPTS[0])
    prompt = " ".join(f"w{i}" for i in PROMPTS[0])
    assert main(["generate", str(d), "--prompt", prompt, "--max-tokens", str(N_NEW), "--threads", "1"]) == 0
    words = [f"w{i}" for i in ref if i != 2]  # EOS (id 2) is a special token only in the model config
    assert capsys.readouterr().out.split()[:len(PROMPTS[0]) + len(words)] == prompt.split() + words


def test_static_decode_matches_hf(hf_model, monkeypatch):
    """The CUDA-graph decode (millis.gen.cuda_graph) with capture=False: its static-shape step (bucket
    rows, all max_seq keys, idle rows at the scratch position, its own mask) run eagerly on CPU gives
    the eager decode's logits and HF's greedy tokens, Mistral's sliding window included."""
    from millis.common.errors import MillisError
    from millis.gen.cuda_graph import GraphedDecode
    from millis.gen.models.layers import make_batch

    kind, model, d = hf_model
    monkeypatch.setenv("MILLIS_NO_KERNELS", "1")  # the torch model (as on a GPU)
    eng = open_engine(str(d), EngineConfig(max_batch=4, max_seq=64))
    with pytest.raises(MillisError, match="CUDA"):
        GraphedDecode(eng.model, eng.max_batch, eng.max_seq)  # capture needs CUDA
    static = GraphedDecode(eng.model, eng.max_batch, eng.max_seq, capture=False, buckets=(1, 2))
    # one decode step of rows in slots 0 and 2 (bucket 4: slots 1 and 3 idle), past the window of 6
    prompts, slots = [PROMPTS[2], PROMPTS[1]], [0, 2]
    with torch.inference_mode():
        for p, s in zip(prompts, slots):
            eng.model(make_batch([p], [0], [s], eng.window))
        tokens, positions = [p[-1] for p in prompts], [len(p) for p in prompts]
        eager = eng.model(make_batch([[t] for t in tokens], positions, slots, eng.window))[:, -1]
        assert torch.allclose(static(tokens, positions, slots), eager, atol=1e-5), kind
    ref = [_hf_greedy(model, p) for p in PROMPTS]
    eng.decode = static
    assert _run(eng, PROMPTS) == ref, kind
    small = open_engine(str(d), EngineConfig(max_batch=2, max_seq=64, max_prefills_per_step=1))
    small.decode = GraphedDecode(small.model, small.max_batch, small.max_seq, capture=False)
    assert _run(small, PROMPTS + PROMPTS[::-1]) == ref + ref[::-1], kind  # slots reused


def test_static_prefill_matches_hf(hf_model, monkeypatch):
    """The CUDA-graph prefill (millis.gen.cuda_prefill) with capture=False: a lone prompt right-padded to its
    token bucket (a bucket past Mistral's window of 6 masks explicitly) gives HF's greedy tokens, with the
    static decode after it, in reused slots."""
    from millis.gen.cuda_graph import GraphedDecode
    from millis.gen.cuda_prefill import GraphedPrefill

    kind, model, d = hf_model
    monkeypatch.setenv("MILLIS_NO_KERNELS", "1")
    eng = open_engine(str(d), EngineConfig(max_batch=2, max_seq=64, max_prefills_per_step=1))
    eng.decode = GraphedDecode(eng.model, eng.max_batch, eng.max_seq, capture=False)
    eng.prefill = GraphedPrefill(eng.model, eng.max_seq, capture=False, buckets=(4, 16))
    if kind == "mistral-window":
        assert eng.prefill.mask[4] is None and eng.prefill.mask[16] is not None
    ref = [_hf_greedy(model, p) for p in PROMPTS]
    assert _run(eng, PROMPTS + PROMPTS[::-1]) == ref + ref[::-1], kind


def test_static_decode_length_buckets_and_compaction(hf_model, monkeypatch):
    """The CUDA-graph decode's KV-length buckets (a step attends over the live length rounded up, not
    over max_seq) and the engine's compaction (a request left above a finished one moves down with its
    KV, so the batch bucket shrinks): HF's greedy tokens for requests that end at different steps."""
    from millis.gen.cuda_graph import GraphedDecode, kv_buckets

    assert kv_buckets(64) == (64,) and kv_buckets(1000) == (256, 512, 1000) and kv_buckets(512) == (256, 512)
    kind, model, d = hf_model
    monkeypatch.setenv("MILLIS_NO_KERNELS", "1")
    eng = open_engine(str(d), EngineConfig(max_batch=4, max_seq=64))
    static = eng.decode = GraphedDecode(eng.model, 4, 64, capture=False, lengths=(8, 16))
    moves = []
    move = static.move_slot
    static.move_slot = lambda src, dst, n: (moves.append((src, dst)), move(src, dst, n))
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (2, 20, 3, 20)]  # slots 0, 2 end first

    def run(e, params=params):
        ids = [e.add(p, sp) for p, sp in zip(PROMPTS, params)]
        got = {i: [] for i in ids}
        while e.has_work:
            for o in e.step():
                got[o.id] += o.token_ids
        return [got[i] for i in ids]

    eager = open_engine(str(d), EngineConfig(max_batch=4, max_seq=64))  # the eager decode (HF's tokens, above)
    assert run(eng) == run(eager), kind
    assert moves == [(3, 0)], moves  # slot 3's request moved down to slot 0 when that one ended
    assert {n for _, n in static.steps} == {16, 64}, static.steps  # prompt 2 starts at 12: never 8
    assert max(b for b, n in static.steps if n == 64) == 2, static.steps  # after the move: bucket 2, not 4
    # all four to position 22 (no move): slot 3's idle row sat at the scratch position (max_seq - 1) while the
    # batch attended over 16 keys; with a sliding window none was visible to it, and a NaN it wrote there
    # would reach this request (weight 0 x NaN) once it attends over all 64
    long = [SamplingParams(max_tokens=20, ignore_eos=True)] * 4
    assert run(eng, long) == run(eager, long), kind
    # rows with output penalties: the moved request's output counts move with it
    moves.clear()
    pen = [replace(sp, frequency_penalty=1.5, presence_penalty=0.5) for sp in params]
    assert run(eng, pen) == run(eager, pen), kind
    assert moves == [(3, 0)], moves


def _saved(tmp_path, config, name: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(tmp_path / name)
    return model, tmp_path / name


@pytest.mark.parametrize("runtime", ["native", "torch"])
def test_sliding_windows_only_where_transformers_applies_them(tmp_path, runtime, monkeypatch):
    """Qwen2 windows only the layers from max_window_layers on (layer_types), and Llama never: millis windowed
    every layer whenever config.json named a window (logits 13.9 off)."""
    import json

    from transformers import LlamaConfig, Qwen2Config

    from millis.common.errors import MillisError
    from millis.gen.models.layers import make_batch

    if runtime == "torch":
        monkeypatch.setenv("MILLIS_NO_KERNELS", "1")
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.1, bos_token_id=1,
                  eos_token_id=2, tie_word_embeddings=False)
    prompt = PROMPTS[2]  # 12 tokens: past the window of 4
    for name, config in (("qwen2", Qwen2Config(use_sliding_window=True, sliding_window=4, max_window_layers=2,
                                               **common)),
                         ("llama", LlamaConfig(**common))):
        model, d = _saved(tmp_path, config, name)
        if name == "llama":  # a window in a Llama config.json: transformers' Llama ignores it
            raw = json.loads((d / "config.json").read_text())
            (d / "config.json").write_text(json.dumps({**raw, "sliding_window": 4}))
        eng = open_engine(str(d), EngineConfig(max_batch=1, max_seq=64))
        with torch.inference_mode():
            ref = model(torch.tensor([prompt])).logits[0]
            ours = eng.model(make_batch([prompt], [0], [0], eng.window, last_only=False))[0]
        assert torch.allclose(ours, ref, atol=1e-4), (name, (ours - ref).abs().max())
    _, d = _saved(tmp_path, Qwen2Config(use_sliding_window=True, sliding_window=4, max_window_layers=1, **common),
                  "mixed")
    with pytest.raises(MillisError, match="1 of 2 layers attend within a sliding window"):
        open_engine(str(d), EngineConfig(max_batch=1, max_seq=64))


@pytest.mark.parametrize("change, named", [({"scale_attn_by_inverse_layer_idx": True}, "scale_attn_by_inverse"),
                                           ({"scale_attn_weights": False}, "scale_attn_weights false"),
                                           ({"activation_function": "relu"}, "activation_function 'relu'"),
                                           ({"n_inner": 128}, "n_inner 128")])
def test_gpt2_settings_millis_does_not_compute_are_refused(tmp_path, change, named):
    """Each was ignored: logits 0.6-3.8 off transformers'; n_inner also sent the native kernels past the weights."""
    from transformers import GPT2Config

    from millis.common.errors import MillisError

    _, d = _saved(tmp_path, GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64, **change), "g")
    with pytest.raises(MillisError, match=f"unsupported gpt2 variant: {named}"):
        open_engine(str(d), EngineConfig(max_batch=1, max_seq=64))


def test_weights_smaller_than_the_config_are_a_clear_error_on_the_native_path(tmp_path):
    """A config whose vocabulary outgrows its weights: the native kernels read past them (a segfault)."""
    import json

    from transformers import LlamaConfig

    from millis.common.errors import MillisError

    _, d = _saved(tmp_path, LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
                                        num_attention_heads=4, max_position_embeddings=64), "l")
    raw = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({**raw, "vocab_size": 4_000_000}))
    with pytest.raises(MillisError, match=r"weights do not match the config: .*expected \(4000000, 64\)"):
        open_engine(str(d), EngineConfig(max_batch=1, max_seq=64))


def test_rope_settings_that_disagree_are_refused(tmp_path):
    """A yarn `rope_scaling` added (as Qwen2.5's model card says) to a config transformers 5 saved with
    `rope_parameters`: transformers runs the yarn, millis read rope_parameters and ran the default RoPE (logits 5.8
    off at 2,000 positions). Both, disagreeing: refused; both the same, or one alone: read."""
    from millis.common.errors import MillisError
    from millis.gen.hf_config import hf_model_config

    base = {"model_type": "qwen2", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 4096}
    v5 = {"rope_type": "default", "rope_theta": 1e6}
    with pytest.raises(MillisError, match="rope_parameters default x1 and rope_scaling yarn x4"):
        hf_model_config({**base, "rope_parameters": v5, "rope_scaling": {"type": "yarn", "factor": 4.0}}, True)
    linear = {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}
    assert hf_model_config({**base, "rope_parameters": linear, "rope_scaling": linear}, True).rope_factor == 2.0
    assert hf_model_config({**base, "rope_parameters": v5}, True).rope_theta == 1e6
    assert hf_model_config({**base, "rope_scaling": {"type": "linear", "factor": 3.0}}, True).rope_factor == 3.0


def test_the_head_is_tied_as_config_json_says(tmp_path):
    """The head as transformers reads it: an untied model (tie_word_embeddings false, or absent on a Llama) whose file
    lacks lm_head.weight is refused (millis ran the embedding as its head: logits 4.6 off, no token alike), and a
    tied one whose file holds a different lm_head runs that head, as transformers 5 does."""
    import json

    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    from millis.common.errors import MillisError
    from millis.gen.models.layers import make_batch

    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                  max_position_embeddings=64, initializer_range=0.1)
    _, d = _saved(tmp_path, LlamaConfig(tie_word_embeddings=False, **common), "untied")
    weights = load_file(d / "model.safetensors")
    save_file({k: v for k, v in weights.items() if k != "lm_head.weight"}, d / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(MillisError, match="tie_word_embeddings false .* no lm_head.weight"):
        open_engine(str(d), EngineConfig(max_batch=1, max_seq=64))
    raw = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps({k: v for k, v in raw.items() if k != "tie_word_embeddings"}))
    with pytest.raises(MillisError, match="no lm_head.weight"):  # Llama's default: untied
        open_engine(str(d), EngineConfig(max_batch=1, max_seq=64))
    model, d = _saved(tmp_path, LlamaConfig(tie_word_embeddings=True, **common), "tied")
    weights = load_file(d / "model.safetensors")
    weights["lm_head.weight"] = torch.randn_like(weights["model.embed_tokens.weight"])  # a stray, different head
    save_file(weights, d / "model.safetensors", metadata={"format": "pt"})
    model = AutoModelForCausalLM.from_pretrained(d).eval()
    eng = open_engine(str(d), EngineConfig(max_batch=1, max_seq=64))
    with torch.inference_mode():
        ref = model(torch.tensor([PROMPTS[1]])).logits[0]
        ours = eng.model(make_batch([PROMPTS[1]], [0], [0], eng.window, last_only=False))[0]
    assert torch.allclose(ours, ref, atol=1e-4), (ours - ref).abs().max()


def test_a_mistral_config_without_a_window_key_takes_mistrals_default():
    """transformers' MistralConfig defaults sliding_window to 4096 where config.json leaves the key out (null: no
    window); millis read both as none, and diverged from position 4096 on."""
    from millis.gen.hf_config import hf_model_config

    base = {"model_type": "mistral", "vocab_size": 64, "hidden_size": 32, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 64, "max_position_embeddings": 32768}
    assert hf_model_config(base, False).sliding_window == 4096
    assert hf_model_config({**base, "sliding_window": None}, False).sliding_window == 0
    assert hf_model_config({**base, "sliding_window": 8}, False).sliding_window == 8
    qwen = {**base, "model_type": "qwen2", "use_sliding_window": True, "max_window_layers": 0}  # Qwen2Config's too
    assert hf_model_config(qwen, False).sliding_window == 4096


def test_an_encoder_folder_is_named_as_one_not_as_a_missing_head(tiny_dirs):
    """`millis generate` on an encoder's folder said its lm_head.weight was missing (the head check ran first)."""
    from millis.common.errors import MillisError

    with pytest.raises(MillisError, match="unsupported model_type 'bert'"):
        open_engine(str(tiny_dirs["bert"]), EngineConfig(max_batch=1, max_seq=64))


def test_a_sharded_checkpoint_decodes_as_its_one_file_and_bin_weights_are_named(tmp_path):
    """A decoder saved past max_shard_size (model.safetensors.index.json and its shards: how Llama-3.2-3B and larger
    ship) gives the one file's logits; a shard the index names but the folder lacks, and .bin weights, are named
    (millis.common.files.weight_files, the encoders' rule too)."""
    import shutil

    from millis.common.errors import MillisError
    from millis.gen.models.layers import make_batch

    model, one = _saved(tmp_path, _hf_config("llama-gqa-untied"), "one")
    sharded = tmp_path / "sharded"
    model.save_pretrained(sharded, max_shard_size="30KB")
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) >= 3 and not (sharded / "model.safetensors").exists()
    prompt = PROMPTS[2]
    logits = []
    for d in (one, sharded):
        eng = open_engine(str(d), EngineConfig(max_batch=1, max_seq=64))
        with torch.inference_mode():
            logits.append(eng.model(make_batch([prompt], [0], [0], eng.window, last_only=False))[0])
    assert torch.equal(logits[0], logits[1])
    shards[1].unlink()
    with pytest.raises(MillisError, match=f"missing: {shards[1].name}"):
        open_engine(str(sharded), EngineConfig(max_batch=1, max_seq=64))
    binary = tmp_path / "bin"
    shutil.copytree(one, binary)
    (binary / "model.safetensors").unlink()
    torch.save(model.state_dict(), binary / "pytorch_model.bin")
    with pytest.raises(MillisError, match="has pytorch_model.bin: only safetensors weights are read"):
        open_engine(str(binary), EngineConfig(max_batch=1, max_seq=64))
