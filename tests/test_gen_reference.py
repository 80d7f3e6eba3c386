"""Real trained llama2.c models (../shared/models): our loader, tokenizer and forward pass give the
reference values their READMEs document (a float64 NumPy forward; llama2.c's run.c output)."""
import pytest
import torch

from conftest import shared_model
from millis.gen import EngineConfig, SamplingParams, open_engine
from millis.gen.models.layers import make_batch

STORIES = {
    "dir": "stories260K",
    "prompt_ids": [1, 403, 407, 261, 378],
    "greedy20": [432, 383, 286, 261, 376, 298, 315, 421, 395, 317, 426, 338, 401, 396, 267, 337, 410, 408, 419, 292],
    "argmax": 432, "max": 17.79940, "mean": -4.40791, "first4": [-10.13658, -5.32946, -10.13809, -10.13686],
}
BABY = {
    "dir": "babyllama-tok105",
    "prompt_ids": [1, 3, 34, 9, 22, 4, 3, 18, 20, 7, 9, 3, 5, 3, 6, 10, 16, 4],
    "greedy20": [25, 3, 6, 8, 4, 13, 4, 3, 17, 5, 12, 3, 5, 3, 14, 10, 6, 6, 14, 4],
    "argmax": 25, "max": 10.03456, "mean": -3.48312, "first4": [-1.39100, -1.72497, -8.21062, 6.18944],
}
DOC_260K = ('Once upon a time, there was a little girl named Lily. She loved to play outside in the park. One day, '
            'she saw a big, red ball. She wanted to play with it, but it was too high.\nLily\'s mom said, "Lily, '
            'let\'s go to the park')


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("ref", [STORIES, BABY], ids=["stories260K", "babyllama"])
def test_llama2c_matches_reference(ref):
    eng = open_engine(str(shared_model(ref["dir"])), EngineConfig(max_batch=1))
    # babyllama's README gives the ids of " Once upon a time" (its leading space is the dummy prefix)
    assert eng.tok.encode("Once upon a time") == ref["prompt_ids"]
    with torch.inference_mode():
        logits = eng.model(make_batch([ref["prompt_ids"]], [0], [0]))[0, -1]
    assert int(logits.argmax()) == ref["argmax"]
    assert float(logits.max()) == pytest.approx(ref["max"], abs=1e-4)
    assert float(logits.mean()) == pytest.approx(ref["mean"], abs=1e-4)
    assert logits[:4].tolist() == pytest.approx(ref["first4"], abs=1e-4)
    rid = eng.add(ref["prompt_ids"], SamplingParams(max_tokens=20))
    ids = [t for _ in range(20) for o in eng.step() if o.id == rid for t in o.token_ids]
    assert ids == ref["greedy20"]


def test_cli_prints_llama2c_documented_output(capsys):
    from millis.cli.main import main

    d = shared_model("stories260K")
    assert main(["generate", str(d), "--prompt", "Once upon a time", "--max-tokens", "40", "--temperature", "0",
                 "--threads", "1"]) == 0
    out = capsys.readouterr()
    text = out.out.rstrip("\n")
    assert len(text) > 100 and DOC_260K.startswith(text)
    assert "40 new tokens, finished: length" in out.err
    # the whole documented output, streamed
    assert main(["generate", str(d / "stories260K.bin"), "--prompt", "Once upon a time", "--max-tokens", "80",
                 "--stream", "--threads", "1"]) == 0
    assert capsys.readouterr().out.startswith(DOC_260K)


@pytest.mark.parametrize("ref", [STORIES, BABY], ids=["stories260K", "babyllama"])
@pytest.mark.parametrize("dtype,quant", [("bf16", "none"), ("fp32", "int8"), ("fp32", "int8-torch")])
def test_llama2c_precisions_close_to_fp32(ref, dtype, quant):
    """Each precision on the real models: the documented next token, and at every position of fp32's
    greedy run (3 prompts x 60 tokens, teacher-forced) logits within test_gen_engine.PRECISION_TOL."""
    import warnings

    from millis.kernels.cpu_int8 import library
    from test_gen_engine import assert_close_to_fp32, precision

    d = str(shared_model(ref["dir"]))
    fp32 = open_engine(d, EngineConfig(max_batch=3))
    with warnings.catch_warnings():  # int8 without millis's kernel here: torch's, with a warning
        warnings.simplefilter("ignore")
        eng = open_engine(d, EngineConfig(max_batch=1, dtype=dtype, quant=quant))
    fallback = quant == "int8" and library() is None
    assert precision(eng) == ("int8-torch" if fallback else dtype if quant == "none" else quant)
    with torch.inference_mode():
        logits = eng.model(make_batch([ref["prompt_ids"]], [0], [0]))[0, -1]
    assert int(logits.argmax()) == ref["argmax"]
    prompts = [ref["prompt_ids"], ref["prompt_ids"][:3], ref["prompt_ids"][:1] + ref["greedy20"][5:9]]
    assert_close_to_fp32(fp32, eng, prompts, 60)
