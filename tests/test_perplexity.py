"""`millis eval MODEL --text FILE`: the README's form end to end on stories260K, the window flags' errors (one line
each, exit 2), the model's positions, what --score-tokens counts, and the scoped MILLIS_EVAL_* variables."""
import json

import pytest

from conftest import shared_model
from millis.cli.main import main
from millis.gen.perplexity import windows

STORY = "Once upon a time there was a little girl named Lily. She liked to play in the park with her dog. "


@pytest.fixture
def book(tmp_path):
    p = tmp_path / "book.txt"
    p.write_text(STORY * 30, encoding="utf-8")
    return p


@pytest.fixture(scope="module")
def model() -> str:
    return str(shared_model("stories260K"))


def run_eval(capsys, *argv: str) -> tuple[int, dict | None, str]:
    rc = main(["eval", *argv])
    out, err = capsys.readouterr()
    return rc, (json.loads(out.strip().splitlines()[-1]) if rc == 0 else None), err


def one_line_error(capsys, *argv: str) -> str:
    rc, _, err = run_eval(capsys, *argv)
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


def n_ids(model: str, text: str) -> int:
    from millis.gen import EngineConfig, open_engine

    return len(open_engine(model, EngineConfig(max_batch=1, max_seq=64)).tok.encode(text))


def test_readme_form_scores_every_token(model, book, tmp_path, capsys):
    out = tmp_path / "ppl.json"
    rc, res, _ = run_eval(capsys, model, "--text", str(book), "--context", "512", "--stride", "256",
                          "--json", str(out))
    assert rc == 0 and json.loads(out.read_text()) | {"tokens_per_s": 0} == res | {"tokens_per_s": 0}
    n = n_ids(model, book.read_text())
    assert res["tokens"] == n - 1 and res["context"] == 512 and res["stride"] == 256
    assert (res["dtype"], res["quant"], res["score_tokens"]) == ("fp32", "none", 0)  # which weights gave it
    assert 1.0 < res["perplexity"] < 10.0  # a repeated story: the model predicts it well
    # the figure itself, computed here: HF's perplexity guide's sliding windows over the engine's logits, each window
    # scoring the targets the previous one did not, log-softmax of the logit before each
    import math

    import torch

    from millis.gen import EngineConfig, open_engine

    eng = open_engine(model, EngineConfig(max_batch=1, max_seq=512))
    ids = eng.tok.encode(book.read_text())
    nll, scored, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids) - 1, 256):
        end = min(begin + 512, len(ids))
        first = max(prev_end, begin + 1)  # the first target this window scores
        logp = torch.log_softmax(eng.logits(ids[begin:end]).double(), -1)  # row i predicts ids[begin + i + 1]
        for t in range(first, end):
            nll -= float(logp[t - 1 - begin, ids[t]])
        scored, prev_end = scored + end - first, end
        if end == len(ids):
            break
    assert scored == res["tokens"]
    assert res["perplexity"] == pytest.approx(math.exp(nll / scored), rel=1e-4)


def test_small_context_alone_uses_half_of_it_as_stride(model, book, capsys):
    rc, res, _ = run_eval(capsys, model, "--text", str(book), "--context", "64")
    assert rc == 0 and res["stride"] == 32 and res["tokens"] == n_ids(model, book.read_text()) - 1


@pytest.mark.parametrize("flags, named", [
    (("--context", "1"), "--context must be >= 2, got 1"),
    (("--context", "64", "--stride", "65"), "--stride must be in 1..64"),
    (("--stride", "-1"), "--stride must be in 1..512"),
    (("--score-tokens", "-1"), "--score-tokens must be >= 0"),
    (("--threads", "-1"), "--threads must be >= 0"),
    (("--kv-memory-mb", "-1"), "--kv-memory-mb must be >= 0"),
])
def test_bad_window_flags_name_their_flag(model, book, capsys, flags, named):
    assert named in one_line_error(capsys, model, "--text", str(book), *flags)


def test_context_past_the_models_positions_is_refused(model, book, capsys):
    # stories260K has 512 positions: a 1024 window used to shrink to 512 with stride 256 left as is... and the JSON
    # reported 1024; now refused, naming the flag and the maximum
    err = one_line_error(capsys, model, "--text", str(book), "--context", "1024")
    assert "--context 1024" in err and "512" in err


@pytest.mark.parametrize("n", [1, 100, 400])
def test_score_tokens_scores_that_many(model, book, capsys, n):
    rc, res, _ = run_eval(capsys, model, "--text", str(book), "--context", "64", "--score-tokens", str(n))
    assert rc == 0 and res["tokens"] == n


def test_windows_cover_every_token_once():
    for n in (2, 3, 63, 64, 65, 200, 873):
        for context, stride in ((64, 32), (64, 63), (64, 1), (2, 1), (512, 256)):
            scored = [t for _, end, first in windows(n, context, stride) for t in range(first, end)]
            assert scored == list(range(1, n)), (n, context, stride)


def test_eval_needs_data_or_text(model, book, tmp_path, capsys):
    assert "--data FILE" in one_line_error(capsys, model) and "--text FILE" in one_line_error(capsys, model)
    csv = tmp_path / "d.csv"
    csv.write_text("text,label\na,b\n")
    assert "give one" in one_line_error(capsys, model, "--text", str(book), "--data", str(csv))


def test_text_variables_are_scoped(model, book, monkeypatch, capsys):
    monkeypatch.setenv("MILLIS_TEXT", str(book))  # another tool's: no longer switches eval to perplexity
    monkeypatch.setenv("MILLIS_CONTEXT", "1")  # (and a MILLIS_* variable no command reads is refused, naming eval's)
    err = one_line_error(capsys, model)
    assert "MILLIS_TEXT: no millis command reads it; millis eval reads MILLIS_EVAL_TEXT" in err, err
    assert "MILLIS_CONTEXT: no millis command reads it; millis eval reads MILLIS_EVAL_CONTEXT" in err, err
    monkeypatch.delenv("MILLIS_TEXT")
    monkeypatch.delenv("MILLIS_CONTEXT")
    monkeypatch.setenv("MILLIS_EVAL_TEXT", str(book))
    monkeypatch.setenv("MILLIS_EVAL_CONTEXT", "64")
    rc, res, _ = run_eval(capsys, model)
    assert rc == 0 and res["context"] == 64 and res["text"] == str(book)


def test_output_and_input_problems_are_one_line(model, book, tmp_path, capsys):
    err = one_line_error(capsys, model, "--text", str(book), "--json", str(tmp_path / "missing" / "r.json"))
    assert "--json" in err and "does not exist" in err
    assert "is a directory" in one_line_error(capsys, model, "--text", str(book), "--json", str(tmp_path))
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"Once upon a time\nthe caf\xe9 was open\n")
    err = one_line_error(capsys, model, "--text", str(bad))
    assert "line 2 is not valid UTF-8" in err


def test_a_nan_loss_is_an_error_and_an_overflow_is_infinite():
    """NaN logits give no figure (it printed NaN, invalid JSON, with exit 0); a mean loss past exp's range is an
    infinite perplexity (math.exp raised OverflowError: a traceback)."""
    import math

    import torch

    from millis.common.errors import MillisError
    from millis.gen.perplexity import score_ids

    class Fake:
        max_seq = 64

        def __init__(self, first: float):
            self.first = first

        def logits(self, ids):  # (len(ids), 8): token 0 favoured by `first` over the others
            x = torch.zeros(len(ids), 8)
            x[:, 0] = self.first
            return x

    ids = [1] * 20
    assert math.isclose(score_ids(Fake(0.0), ids, 8, 4).perplexity, 8.0, rel_tol=1e-6)  # uniform over 8
    assert score_ids(Fake(1e4), ids, 8, 4).perplexity == math.inf
    with pytest.raises(MillisError, match="NaN on 19 of"):
        score_ids(Fake(float("nan")), ids, 32, 16)

