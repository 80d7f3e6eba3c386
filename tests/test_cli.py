"""The CLI parses flags into a config and calls the stage; errors exit 2 with one clear line."""
import json
import os
import subprocess
import sys

from millis.cli.main import main


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
    assert main(["predict", str(out), "where is my card?", "great service"]) == 0
    lines = [json.loads(line.split("  (")[0]) for line in capsys.readouterr().out.strip().splitlines()]
    assert [ln["text"] for ln in lines] == ["where is my card?", "great service"]
    assert all(ln["label"] in ("negative", "neutral", "positive") for ln in lines)



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
    assert "unknown preset" in capsys.readouterr().err


def test_console_script_entry_point():
    exe = os.path.join(os.path.dirname(sys.executable), "millis")
    r = subprocess.run([exe, "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "optimize" in r.stdout
