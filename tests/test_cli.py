"""The CLI parses flags into a config and calls the stage; errors exit 2 with one clear line."""
import json
import os
import re
import subprocess
import sys

import pytest

from millis.cli.flags import flags_of
from millis.cli.main import COMMANDS, config_from_argv, main
from millis.common.config import Shape, flag_fields
from millis.common.errors import MillisError
from millis.artifact.model import open_model


def test_cli_optimize_info_predict(tmp_path, tiny_dirs, capsys):
    out = tmp_path / "art"
    rc = main(["optimize", "tiny:distilbert", "--task", "classify", "--out", str(out), "--preset", "quick",
               "--variants", "ort-fp32-fused", "--target", "b1xs16", "--shapes", "b1xs16", "--iters", "4"])
    assert rc == 0
    assert "| **" in capsys.readouterr().out  # the report table with the chosen variant in bold
    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "variant" in info and "b1xs16" in info
    assert main(["info", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["task"] == "classify"
    long = "card " * 200  # cut to the model's length: said inside its JSON line (a suffix after it broke the line)
    assert main(["predict", str(out), "where is my card?", "great service", long]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [ln["truncated"] for ln in lines] == [False, False, True]
    lines = lines[:2]
    assert [ln["text"] for ln in lines] == ["where is my card?", "great service"]
    ref = open_model("tiny:distilbert", task="classify").predict(["where is my card?", "great service"])
    assert [ln["label"] for ln in lines] == [r["label"] for r in ref]  # fp32 fused graph: the fp32 labels
    assert [ln["score"] for ln in lines] == pytest.approx([r["score"] for r in ref], abs=1e-3)



def test_cli_optimize_on_labelled_data(tmp_path, tiny_dirs, capsys):
    data = tmp_path / "d.csv"
    data.write_text("sentence,sentiment\nwhere is my card?,negative\nrefund?,neutral\ngreat service,positive\n"
                    "I want to close my account.,negative\n")
    out = tmp_path / "art"
    rc = main(["optimize", "tiny:bert", "--task", "classify", "--out", str(out), "--preset", "quick",
               "--variants", "ort-int8-dynamic", "--target", "b1xs16", "--shapes", "b1xs16", "--iters", "4",
               "--threads", "1", "--data", str(data), "--text-col", "sentence", "--label-col", "sentiment",
               "--max-drop", "100", "--no-recover"])
    assert rc == 0
    assert f"within 100.0 accuracy points of fp32 on {data}" in capsys.readouterr().out
    meta = json.loads((out / "millis.json").read_text())
    assert meta["config"]["budget"]["max_drop"] == 100.0 and meta["config"]["recover"] is False
    assert meta["config"]["label_col"] == "sentiment" and meta["measured"]["accuracy"]["n"] == 4
    assert json.loads((out / "report.json").read_text())["recovery"] == {"needed": False, "why": "disabled",
                                                                         "attempts": []}
    assert main(["info", str(out)]) == 0
    info = capsys.readouterr().out
    assert f"on {data} (fp32 " in info and "budget -100.0 pt" in info and "kept fp32" not in info

def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["optimize", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: model directory not found") and err.count("\n") == 1
    assert main(["info", str(tmp_path)]) == 2
    assert "not a millis artifact" in capsys.readouterr().err
    assert main(["optimize", "tiny:bert", "--preset", "nope"]) == 2
    assert capsys.readouterr().err == "error: --preset='nope': expected one of cpu, quick\n"
    assert main(["optimize", "tiny:bert", "--iters", "many"]) == 2
    assert capsys.readouterr().err == "error: --iters='many': expected an integer\n"
    assert main(["optimize", "tiny:bert", "--shapes", "b1xs16,b0xs8"]) == 2
    assert capsys.readouterr().err == "error: --shapes: shape must have batch >= 1 and seq >= 1, got 0x8\n"
    assert main(["optimize", "tiny:bert", "--no-such-flag"]) == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments: --no-such-flag" in err and err.count("\n") == 1
    assert main(["eval", "model-dir"]) == 2
    err = capsys.readouterr().err
    assert "needs --data FILE" in err and "--text FILE" in err and err.count("\n") == 1


def test_console_script_and_module_entry_points():
    exe = os.path.join(os.path.dirname(sys.executable), "millis")
    for cmd in ([exe, "--help"], [sys.executable, "-m", "millis.cli", "--help"],
                [sys.executable, "-m", "millis", "--help"]):
        r = subprocess.run(cmd, capture_output=True, text=True)
        assert r.returncode == 0 and "optimize" in r.stdout and "generate" in r.stdout


def test_bad_variable_is_one_line_for_the_commands_that_read_it():
    """MILLIS_THREADS=two used to crash every command, even `serve --help`, with a traceback."""
    exe = os.path.join(os.path.dirname(sys.executable), "millis")
    env = {**os.environ, "MILLIS_THREADS": "two"}
    r = subprocess.run([exe, "serve", "--help"], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "MILLIS_THREADS" in r.stdout and r.stderr == ""
    r = subprocess.run([exe, "serve", "some-artifact"], capture_output=True, text=True, env=env)
    assert (r.returncode, r.stdout, r.stderr) == (2, "", "error: MILLIS_THREADS='two': expected an integer\n")
    r = subprocess.run([exe, "info", "no-such-artifact"], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "MILLIS_THREADS" not in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("command", ["optimize", "train", "eval", "predict", "serve", "generate"])
def test_threads_variable_is_parsed_by_every_command_that_has_the_flag(command, monkeypatch, capsys):
    monkeypatch.setenv("MILLIS_THREADS", "2.5")
    argv = {"train": ["--data", "d.csv"], "eval": ["--data", "d.csv"], "predict": ["hello"]}.get(command, [])
    assert main([command, "model-dir", *argv]) == 2
    assert capsys.readouterr().err == "error: MILLIS_THREADS='2.5': expected an integer\n"
    monkeypatch.setenv("MILLIS_THREADS", "3")
    cfg = config_from_argv([command, "model-dir", *argv])[1]
    cfg = cfg[0] if isinstance(cfg, tuple) else cfg
    assert getattr(getattr(cfg, "measure", cfg), "threads") == 3


@pytest.mark.parametrize("env, recover", [
    ({}, True), ({"MILLIS_NO_RECOVER": "false"}, True), ({"MILLIS_NO_RECOVER": "0"}, True),
    ({"MILLIS_NO_RECOVER": "No"}, True), ({"MILLIS_NO_RECOVER": "TRUE"}, False), ({"MILLIS_NO_RECOVER": "on"}, False),
    ({"MILLIS_RECOVER": "off"}, False), ({"MILLIS_RECOVER": "yes"}, True), ({"MILLIS_NO_RECOVER": ""}, True)])
def test_boolean_variables_mean_what_they_say(env, recover, monkeypatch):
    """MILLIS_NO_RECOVER=false used to turn recovery off (any non-empty value but "0" did)."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert config_from_argv(["optimize", "tiny:bert"])[1].recover is recover
    assert config_from_argv(["optimize", "tiny:bert", "--recover"])[1].recover is True
    assert config_from_argv(["optimize", "tiny:bert", "--no-recover"])[1].recover is False


def test_a_boolean_variable_accepts_only_boolean_words(monkeypatch, capsys):
    monkeypatch.setenv("MILLIS_NO_RECOVER", "maybe")
    assert main(["optimize", "tiny:bert"]) == 2
    assert capsys.readouterr().err == ("error: MILLIS_NO_RECOVER='maybe': expected one of 1, true, yes, on, 0, "
                                       "false, no, off\n")
    monkeypatch.setenv("MILLIS_NO_RECOVER", "1")
    monkeypatch.setenv("MILLIS_RECOVER", "1")
    assert main(["optimize", "tiny:bert"]) == 2
    assert "MILLIS_RECOVER and MILLIS_NO_RECOVER are both set" in capsys.readouterr().err


def test_presets_are_scoped_per_command(monkeypatch, capsys):
    """MILLIS_PRESET meant cpu|quick to optimize and default|quick to train; each command has its own now."""
    from millis.optimize.config import PRESETS

    monkeypatch.setenv("MILLIS_PRESET", "quick")  # no longer read by anyone: refused, naming the command's own
    with pytest.raises(MillisError, match=r"^MILLIS_PRESET: no millis command reads it; millis optimize reads "
                                          r"MILLIS_OPTIMIZE_PRESET$"):
        config_from_argv(["optimize", "tiny:bert"])
    with pytest.raises(MillisError, match=r"millis train reads MILLIS_TRAIN_PRESET$"):
        config_from_argv(["train", "tiny:bert", "--data", "d.csv"])
    monkeypatch.delenv("MILLIS_PRESET")
    monkeypatch.setenv("MILLIS_OPTIMIZE_PRESET", "quick")
    cfg = config_from_argv(["optimize", "tiny:bert"])[1]
    assert cfg.preset == "quick" and cfg.measure == PRESETS["quick"]
    assert config_from_argv(["train", "tiny:bert", "--data", "d.csv"])[1].epochs == 8  # train's default preset
    monkeypatch.setenv("MILLIS_TRAIN_PRESET", "quick")
    assert config_from_argv(["train", "tiny:bert", "--data", "d.csv"])[1].epochs == 1
    assert config_from_argv(["distill", "t", "--data", "d.csv"])[1].train.epochs == 8  # MILLIS_DISTILL_PRESET unset
    monkeypatch.setenv("MILLIS_PRUNE_PRESET", "cpu")
    assert main(["prune", "m", "--data", "d.csv", "--heads", "0.5"]) == 2
    assert capsys.readouterr().err == "error: MILLIS_PRUNE_PRESET='cpu': expected one of default, quick\n"


def test_flag_beats_variable_beats_default(monkeypatch):
    from millis.optimize.config import PRESETS
    from millis.common.config import Shape

    assert config_from_argv(["serve", "art"])[1][0].port == 8000
    monkeypatch.setenv("MILLIS_PORT", "8100")
    assert config_from_argv(["serve", "art"])[1][0].port == 8100
    assert config_from_argv(["serve", "art", "--port", "8200"])[1][0].port == 8200
    monkeypatch.setenv("MILLIS_WARMUP", "off")
    assert config_from_argv(["serve", "art"])[1][0].warmup is False
    assert config_from_argv(["serve", "art", "--warmup"])[1][0].warmup is True
    # train: the preset's schedule, then the variables, then the flags
    base = ["train", "tiny:bert", "--data", "d.csv", "--preset", "quick"]
    assert config_from_argv(base)[1].epochs == 1
    monkeypatch.setenv("MILLIS_EPOCHS", "3")
    assert config_from_argv(base)[1].epochs == 3
    assert config_from_argv(base + ["--epochs", "5"])[1].epochs == 5
    assert config_from_argv(base)[1].sample == 512  # what the flags leave alone stays the preset's
    # optimize: a measurement flag overrides the preset's value and leaves the rest of it
    monkeypatch.setenv("MILLIS_ITERS", "7")
    cfg = config_from_argv(["optimize", "tiny:bert", "--preset", "quick", "--shapes", "b4xs64,1x8"])[1]
    assert cfg.measure.shapes == (Shape(4, 64), Shape(1, 8)) and cfg.measure.iters == 7
    assert cfg.measure.rounds == PRESETS["quick"].rounds and cfg.target == Shape(1, 128)
    monkeypatch.setenv("MILLIS_MAX_DROP", "2")
    assert config_from_argv(["optimize", "x", "--task", "classify", "--max-drop", "1.5"])[1].budget.max_drop == 1.5
    assert config_from_argv(["optimize", "x", "--task", "classify"])[1].budget.max_drop == 2.0


def test_flags_with_structure():
    cfg = config_from_argv(["optimize", "x", "--variants", "ort-fp32,ort-int8-dynamic", "--compress"])[1]
    assert cfg.variants == ("ort-fp32", "ort-int8-dynamic") and cfg.compress == "default"
    assert config_from_argv(["optimize", "x", "--compress", "quick"])[1].compress == "quick"
    assert config_from_argv(["optimize", "x"])[1].compress == ""
    from millis.optimize.compress import COMPRESS_PRESETS

    compress = next(f for f in flags_of(COMMANDS[0]) if f.name == "compress")
    assert all(name in compress.help_text() for name in COMPRESS_PRESETS)  # the help names every preset
    with pytest.raises(MillisError, match=r"^unknown --compress preset 'big'; available: default, quick$"):
        config_from_argv(["optimize", "x", "--compress", "big"])
    cfg = config_from_argv(["distill", "t", "--data", "d.csv", "--layer-map", "0,2", "--layers", "2", "--out", "o"])[1]
    assert (cfg.layer_map, cfg.layers, cfg.train.out, cfg.train.source) == ((0, 2), 2, "o", "t")
    assert config_from_argv(["distill", "t", "--data", "d.csv"])[1].train.out == "models/student"
    assert config_from_argv(["prune", "m", "--data", "d.csv", "--ffn", "0.5"])[1].train.out == "models/pruned"
    assert config_from_argv(["predict", "art", "a, b", "c"])[1].texts == ("a, b", "c")  # no comma splitting


def test_an_empty_variable_counts_as_unset(monkeypatch):
    monkeypatch.setenv("MILLIS_PORT", "")
    monkeypatch.setenv("MILLIS_SHAPES", "")
    assert config_from_argv(["serve", "art"])[1][0].port == 8000
    cfg = config_from_argv(["optimize", "x", "--task", "rerank"])[1]  # a cross-encoder: built as classify
    assert (cfg.task, cfg.model_task) == ("rerank", "classify")
    serve, ray = config_from_argv(["serve", "art", "--autoscale", "1:4"])[1]
    assert (serve.artifact, ray.replicas, ray.scale_range()) == ("art", 0, (1, 4))
    assert config_from_argv(["optimize", "x", "--preset", "quick"])[1].measure.shapes == (Shape(1, 16), Shape(2, 32))


# The flags each command had before they were generated from the configs: none may go missing.
OLD_FLAGS = {
    "optimize": "source --task --out --preset --variants --shapes --target --min-cosine --max-logit-diff --iters "
                "--threads --max-length --sample-texts --calibration-texts --data --max-drop --text-col --label-col "
                "--no-recover --compress --compress-data",
    "train": "source --out --data --preset --validation --text-col --label-col --epochs --batch-size --lr "
             "--weight-decay --warmup --patience --max-length --seed --limit --sample --threads --val-fraction",
    "distill": "--out --data --preset --validation --epochs --layers --layer-map --student --task --temperature "
               "--soft-weight --hard-weight --hidden-weight --attention-weight --threads --seed",
    "prune": "--out --data --preset --epochs --heads --ffn --layers --importance-rows --temperature --lr",
    "eval": "model --data --text-col --label-col --limit --threads --json",
    "info": "artifact --json",
    "predict": "artifact texts --threads",
    "report": "artifact --out",
    "serve": "artifact --host --port --model-name --max-batch --max-batch-tokens --max-wait-ms --max-queue "
             "--max-inputs --max-body-bytes --too-long --request-timeout-s --threads --device --warmup --no-warmup "
             "--shutdown-timeout-s --log-level --chat-template --max-tokens --max-seq --dtype --quant",
    "bench": "url --data --text-col --concurrency --rate --duration --count --inputs --route --model --timeout "
             "--warmup --seed --out",
    "generate": "model --prompt --max-tokens --temperature --top-k --top-p --repetition-penalty --seed --stop "
                "--stream --dtype --quant --max-seq --threads",
}


@pytest.mark.parametrize("command", [c.name for c in COMMANDS])
def test_every_flag_field_is_in_the_help_of_its_command(command, capsys):
    c = next(c for c in COMMANDS if c.name == command)
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    flags = flags_of(c)
    assert {f.name for f in flags} == {f.name for cls in c.groups() for f in flag_fields(cls)}
    for f in flags:
        assert re.search(rf"(^|[\s\[,]){re.escape(f.option)}\b", text), f.option
        for variable in f.variables():
            assert variable in text
    for old in OLD_FLAGS[command].split():
        assert re.search(rf"(^|[\s\[,]){re.escape(old)}\b", text), old


def test_each_unscoped_variable_has_one_meaning():
    """A variable read by several commands has one type in all of them; names that differ are scoped
    (MILLIS_TRAIN_WARMUP is a share of steps, MILLIS_WARMUP serve's on/off, MILLIS_BENCH_WARMUP a count)."""
    seen: dict[str, tuple[str, object]] = {}
    for c in COMMANDS:
        for f in flags_of(c):
            for variable in f.variables():
                first = seen.setdefault(variable, (c.name, f.type))
                assert first[1] == f.type, f"{variable}: {first[1]} in {first[0]}, {f.type} in {c.name}"
    for name in ("PRESET", "DATA", "WARMUP", "LAYERS", "TEMPERATURE", "JSON", "TASK"):  # TASK: optimize's only
        readers = {c.name for c in COMMANDS for f in flags_of(c) if f"MILLIS_{name}" in f.variables()}
        assert len(readers) <= 1, (name, readers)
    assert "MILLIS_PRESET" not in seen and "MILLIS_DATA" not in seen  # MILLIS_DATA is the benches' data directory


def test_help_shows_the_default_presets_values(capsys):
    """prune's recovery runs 2 epochs at 5e-5 by its default preset; --help said TrainConfig's 8 and 1e-4."""
    with pytest.raises(SystemExit):
        main(["prune", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 2, the default preset's) [env MILLIS_EPOCHS]" in text
    assert "(default: 5e-05, the default preset's) [env MILLIS_LR]" in text
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "(default: 8) [env MILLIS_EPOCHS]" in " ".join(capsys.readouterr().out.split())
    assert "MILLIS_BENCH_MAX_TOKENS" in next(f for c in COMMANDS if c.name == "bench" for f in flags_of(c)
                                             if f.name == "max_tokens").variables()  # not serve's default


def test_training_progress_reaches_a_log_file():
    """Output that is not a terminal gets a plain line per 5% of an epoch (loss, rate, ETA), not a silent
    progress bar; each epoch starts counting again."""
    from millis.train.step_log import StepLog

    log = StepLog(every=0.05)
    lines = [log.line({"step": s, "epoch": 1, "loss": 0.5, "rows_per_s": 100.0}, 200) for s in range(1, 201)]
    said = [x for x in lines if x]
    assert len(said) == 20 and said[0].startswith("epoch 1: 5% (10/200 steps), loss 0.5000, 100 rows/s, epoch ETA")
    assert said[-1].startswith("epoch 1: 100% (200/200 steps)")
    log.restart()
    assert log.line({"step": 3, "epoch": 2, "loss": 0.4, "rows_per_s": 90.0}, 40) is not None  # 7.5% of epoch 2
    assert log.line({"step": 1, "epoch": 1, "loss": 0.4, "rows_per_s": 90.0}, 1000) is None


def test_optimize_compression_progress_has_step_lines():
    """`millis optimize --compress`: the students' training reports a line per 5% of an epoch too."""
    from millis.optimize.compress import training_lines

    said: list[str] = []
    on = training_lines("student-3l", said.append)
    on("start", {"rows": 400, "steps_per_epoch": 40})
    for s in range(1, 41):
        on("step", {"step": s, "epoch": 1, "loss": 0.3, "rows_per_s": 50.0})
    on("epoch", {"epoch": 1, "train_loss": 0.3, "val_accuracy": 0.9, "seconds": 8.0})
    steps = [x for x in said if "% (" in x]
    assert said[0] == "compress student-3l: training on 400 rows" and len(steps) == 20
    assert steps[0].startswith("compress student-3l: epoch 1: 5% (2/40 steps), loss 0.3000, 50 rows/s")
    assert said[-1].startswith("compress student-3l: epoch 1, loss 0.3000, val_accuracy 0.9000")


@pytest.mark.parametrize("text", ["1_0", "\u0661", "\uff11", "nan", "inf", "-Infinity", "1e999", "0x10", "1.2.3", ""])
def test_float_flags_take_ascii_decimal_numbers_only(text, monkeypatch, capsys):
    """float() took "1_0", Arabic-Indic and fullwidth digits, nan and inf: a --max-drop of nan let every variant
    pass."""
    assert main(["optimize", "tiny:bert", f"--max-drop={text}"]) == 2
    want = "expected a finite number" if text == "1e999" else "expected a number"
    assert capsys.readouterr().err == f"error: --max-drop={text!r}: {want}\n"
    if text:
        monkeypatch.setenv("MILLIS_MAX_DROP", text)
        assert main(["optimize", "tiny:bert"]) == 2
        assert capsys.readouterr().err.startswith(f"error: MILLIS_MAX_DROP={text!r}: expected a")


@pytest.mark.parametrize("text, value", [("1", 1.0), ("-2.", -2.0), (".5", 0.5), ("+3e-2", 0.03), (" 1E2 ", 100.0)])
def test_float_flags_read_the_usual_forms(text, value):
    assert config_from_argv(["optimize", "x", "--task", "classify", f"--max-drop={text}"])[1].budget.max_drop == value


def test_unknown_variants_fail_before_any_work(capsys, tmp_path):
    from millis.optimize.build.variants import CATALOG

    out = tmp_path / "art"
    assert main(["optimize", "tiny:bert", "--variants", "ort-fp32-fused,ort-int9", "--preset", "quick",
                 "--out", str(out)]) == 2
    captured = capsys.readouterr()
    err = captured.err.splitlines()[-1]
    assert err.startswith("error: --variants: unknown variant(s) ort-int9; known: ") and not out.exists()
    assert all(name in err for name in CATALOG) and "building" not in captured.out + captured.err
