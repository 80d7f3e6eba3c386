"""Bad input is one line on stderr and exit 2 (a closed pipe: a quiet exit), never a traceback; each flag's
error names that flag, or the MILLIS_* variable where the value came from one."""
import importlib
import io
import json
import subprocess
import sys

import pytest

from conftest import shared_model
from millis.cli.main import main
from millis.common.readers import read_labeled


def one_line_error(capsys, *argv: str) -> str:
    rc = main(list(argv))
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.fixture(scope="module")
def stories() -> str:
    return str(shared_model("stories260K") / "stories260K.bin")


@pytest.mark.parametrize("flags, named", [
    (("--threads", "-1"), "--threads must be >= 0, got -1"),
    (("--max-tokens", "0"), "--max-tokens must be >= 1, got 0"),
    (("--top-p", "0"), "--top-p must be in (0, 1], got 0"),
    (("--top-p", "1.5"), "--top-p must be in (0, 1]"),
    (("--temperature", "-1"), "--temperature must be in [0, 100]"),
    (("--top-k", "-1"), "--top-k must be >= 0"),
    (("--repetition-penalty", "0"), "--repetition-penalty must be in [0.01, 100]"),
    (("--presence-penalty", "3"), "--presence-penalty must be in [-2, 2]"),
    (("--frequency-penalty", "-3"), "--frequency-penalty must be in [-2, 2]"),
    (("--seed", "-2"), "--seed must be >= -1"),
])
def test_generate_flags_one_message_each(capsys, stories, flags, named):
    assert named in one_line_error(capsys, "generate", stories, *flags)


def test_generate_errors_name_the_variable(capsys, stories, monkeypatch):
    monkeypatch.setenv("MILLIS_THREADS", "-1")
    assert "MILLIS_THREADS must be >= 0, got -1" in one_line_error(capsys, "generate", stories)
    monkeypatch.delenv("MILLIS_THREADS")
    monkeypatch.setenv("MILLIS_TOP_P", "0")
    assert "MILLIS_TOP_P must be in (0, 1]" in one_line_error(capsys, "generate", stories)
    assert "--top-p must be" in one_line_error(capsys, "generate", stories, "--top-p", "2")  # the flag beats it


def test_generate_needs_a_model(capsys):
    assert "required: model" in one_line_error(capsys, "generate")
    assert "the model is empty" in one_line_error(capsys, "generate", "")


def test_stream_into_a_closed_pipe_exits_quietly(stories):
    p = subprocess.Popen([sys.executable, "-m", "millis.cli", "generate", stories, "--prompt", "Once upon a time",
                          "--stream", "--max-tokens", "50"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    p.stdout.close()  # `| head -c 0`: the reader is gone before the first token
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141 and "Traceback" not in err and "BrokenPipe" not in err, err


def test_predict_texts_not_utf8(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"fine\n\xff\xfe bad\n"), errors="surrogateescape"))
    assert "stdin: line 2 is not valid UTF-8" in one_line_error(capsys, "predict", str(tmp_path), "-")
    assert "text 2 is not valid UTF-8" in one_line_error(capsys, "predict", str(tmp_path), "ok", "a\udcff")


def test_long_csv_field(tmp_path):
    p = tmp_path / "long.csv"
    long = "word " * 40_000  # 200,000 characters: past csv's default limit of 131,072
    p.write_text(f'text,label\n"{long}",a\nshort,b\n')
    assert read_labeled(p).texts[0] == long.strip()


def test_report_out_checked_before_running(capsys, tmp_path):
    assert "is a directory" in one_line_error(capsys, "report", str(tmp_path / "art"), "--out", str(tmp_path))
    (tmp_path / "file").write_text("")
    assert "does not exist" in one_line_error(capsys, "report", str(tmp_path), "--out",
                                              str(tmp_path / "file" / "r.html"))


def test_eval_json_checked_before_running(capsys, tmp_path):
    data = tmp_path / "d.csv"
    data.write_text("text,label\na,b\n")
    err = one_line_error(capsys, "eval", "tiny:missing", "--data", str(data), "--json", str(tmp_path / "no" / "r.json"))
    assert "--json" in err and "does not exist" in err


@pytest.mark.parametrize("exc", [OSError(28, "No space left on device"), UnicodeError("bad text"),
                                 __import__("csv").Error("field larger than field limit")])
def test_last_resort_is_one_line(capsys, monkeypatch, exc):
    def boom(argv):
        raise exc

    monkeypatch.setattr(importlib.import_module("millis.cli.main"), "config_from_argv", boom)
    one_line_error(capsys, "info", "x")


@pytest.mark.parametrize("env, argv, named", [
    ({"MILLIS_OPTIMIZE_PRSET": "quick"}, ("--preset", "quick"), "MILLIS_OPTIMIZE_PRSET: not a variable of millis "
                                                                "optimize or of any millis command; did you mean "
                                                                "MILLIS_OPTIMIZE_PRESET? (millis optimize's scoped "
                                                                "ones: MILLIS_OPTIMIZE_DATA, "),
    ({"MILLIS_ITERS": "-1"}, (), "MILLIS_ITERS must be >= 1, got -1"),
    ({}, ("--iters", "0"), "--iters must be >= 1, got 0"),
    ({}, ("--threads", "-2"), "--threads must be >= 0, got -2"),
    ({"MILLIS_COMPRESS": "foo"}, (), "unknown MILLIS_COMPRESS preset 'foo'"),
    ({}, ("--task", "rerank", "--max-drop", "0"), "--max-drop: for --task classify"),
    ({}, ("--task", "embed", "--label-col", "y"), "--label-col: for --task classify"),
    ({}, ("--task", "classify", "--min-cosine", "0.999"), "--min-cosine: not a gate of --task classify"),
    ({}, ("--task", "embed", "--max-logit-diff", "0"), "--max-logit-diff: not a gate of --task embed"),
    ({}, ("--task", "classify", "--min-order-agreement", "1"), "--min-order-agreement: not a gate of --task classify"),
    ({}, ("--task", "rerank", "--min-order-agreement", "-0.1"), "--min-order-agreement must be >= 0, got -0.1"),
    ({"MILLIS_OPTIMIZE_PRESET": "fast"}, (), "MILLIS_OPTIMIZE_PRESET='fast': expected one of cpu, quick"),
])
def test_optimize_errors_name_the_flag_or_variable(capsys, monkeypatch, env, argv, named):
    """A misspelt scoped variable is refused (it silently ran the full preset), and the measurement's and the presets'
    checks name the flag, or the variable the value came from."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert named in one_line_error(capsys, "optimize", "tiny:bert", *argv)


@pytest.mark.parametrize("command, env, named", [
    ("train", {"MILLIS_VAL_FRACTION": "2"}, "MILLIS_VAL_FRACTION must be between 0 and 1, got 2"),
    ("distill", {"MILLIS_DISTILL_TEMPERATURE": "0"}, "MILLIS_DISTILL_TEMPERATURE must be > 0, got 0"),
    ("prune", {"MILLIS_HEADS": "1.5"}, "MILLIS_HEADS"),
    ("distill", {"MILLIS_STUDENT": "some/dir", "MILLIS_DISTILL_LAYERS": "1"}, "MILLIS_DISTILL_LAYERS and --layer-map "
                                                                               "cut the teacher's own layers"),
])
def test_training_commands_name_the_variable_a_bad_value_came_from(capsys, monkeypatch, command, env, named):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    err = one_line_error(capsys, command, "tiny:bert", "--data", "x.csv")
    assert named in err and "--" + named.split()[0].removeprefix("MILLIS_").lower().replace("_", "-") not in err, err


@pytest.mark.parametrize("env, argv, named", [
    ({"MILLIS_PORT": "70000"}, (), "MILLIS_PORT must be in 0..65535, got 70000"),
    ({"MILLIS_MAX_BATCH": "0"}, (), "MILLIS_MAX_BATCH must be >= 1, got 0"),
    ({}, ("--request-timeout-s", "0"), "--request-timeout-s must be > 0, got 0"),  # was "the timeouts > 0"
    ({}, ("--max-inputs", "9", "--max-queue", "4"), "--max-inputs (9) cannot exceed --max-queue (4)"),
    ({}, ("--dtype", "bogus"), "--dtype"),  # accepted, and an encoder server started
    ({"MILLIS_QUANT": "nonsense"}, (), "MILLIS_QUANT"),
])
def test_serve_errors_name_the_flag_or_variable(capsys, monkeypatch, env, argv, named):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert named in one_line_error(capsys, "serve", "some-artifact", *argv)


def test_generate_seed_past_64_bits_names_its_flag(capsys, stories):
    assert "--seed must fit 64 bits" in one_line_error(capsys, "generate", stories, "--seed", str(1 << 64))


@pytest.mark.parametrize("argv, named", [
    (("serve", "x", "--thread", "3"), "unrecognized arguments: --thread 3"),  # set --threads
    (("serve", "x", "--port", "1", "--port=2"), "--port is given twice"),  # the last one won
    (("serve", "x", "--warmup", "--no-warmup"), "--warmup is given twice"),
    (("optimize", "tiny:bert", "--out", "a", "--out", "b"), "--out is given twice"),
])
def test_abbreviated_or_repeated_options_are_refused(capsys, argv, named):
    assert named in one_line_error(capsys, *argv)


def test_info_and_predict_on_a_trained_model_say_what_it_is(capsys, tmp_path):
    """`millis info` / `millis predict` on a `millis train` directory said only that its millis.json was "not a millis
    artifact description": they name the model and the command that builds an artifact from it."""
    from millis.artifact.meta import TRAIN_FORMAT

    (tmp_path / "millis.json").write_text(json.dumps({"format": TRAIN_FORMAT, "version": 1}))
    for argv in (["info", str(tmp_path)], ["predict", str(tmp_path), "hi"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "a model `millis train` wrote, not an artifact" in err and "millis optimize" in err, err
