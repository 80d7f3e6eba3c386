"""MILLIS_* variables: one no command declares is refused, naming the one meant; those the rest of the project reads
(OTHER_VARIABLES) and those another command declares are left alone (optimize review 2026-12-06)."""
from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from millis.cli.main import config_from_argv, main
from millis.common.errors import MillisError

ROOT = Path(__file__).resolve().parent.parent
# a read of a variable: os.environ.get("X" / os.getenv("X" / env_switch("X" / os.environ["X"] / ENV_... = "X", or $X
READ = re.compile(r"""(?:environ\.get|getenv|env_switch|environ\[|ENV_\w+\s*=)\(?\s*["'](MILLIS_[A-Z0-9_]+)"""
                  r"""|\$\{?(MILLIS_[A-Z0-9_]+)""")
SKIP = {".cache", ".venvs", "results", "__pycache__", ".screenshots"}


def project_reads() -> dict[str, str]:
    """{MILLIS_* variable: a file that reads it} over millis/, bench/, tests/, .ci/ and the Makefile."""
    files = [p for d in ("millis", "bench", "tests", ".ci") for p in (ROOT / d).rglob("*")
             if p.is_file() and p.suffix in (".py", ".sh", "") and not SKIP & set(p.parts)] + [ROOT / "Makefile"]
    out: dict[str, str] = {}
    for p in files:
        try:
            text = p.read_text()
        except (OSError, UnicodeDecodeError):
            continue
        for m in READ.finditer(text):
            out.setdefault(m.group(1) or m.group(2), str(p.relative_to(ROOT)))
    return out


def test_an_unscoped_preset_variable_is_refused_naming_the_commands_own(monkeypatch, capsys):
    """MILLIS_PRESET=quick millis optimize ran the full preset without a word."""
    monkeypatch.setenv("MILLIS_PRESET", "quick")
    assert main(["optimize", "tiny:bert"]) == 2
    assert capsys.readouterr().err == ("error: MILLIS_PRESET: no millis command reads it; millis optimize reads "
                                       "MILLIS_OPTIMIZE_PRESET\n")
    monkeypatch.delenv("MILLIS_PRESET")
    monkeypatch.setenv("MILLIS_OPTIMIZE_THREADS", "2")  # the other way: threads is unscoped
    with pytest.raises(MillisError, match=r"^MILLIS_OPTIMIZE_THREADS: no millis command reads it; millis optimize "
                                          r"reads MILLIS_THREADS$"):
        config_from_argv(["optimize", "tiny:bert"])
    monkeypatch.delenv("MILLIS_OPTIMIZE_THREADS")
    monkeypatch.setenv("MILLIS_ITRES", "5")  # a misspelling: the closest name
    with pytest.raises(MillisError, match=r"^MILLIS_ITRES: not a variable of millis optimize or of any millis command; "
                                          r"did you mean MILLIS_ITERS\?"):
        config_from_argv(["optimize", "tiny:bert"])
    monkeypatch.setenv("MILLIS_ZZZ", "1")  # both named, no guess for the second
    with pytest.raises(MillisError, match=r"MILLIS_ITRES: .*; MILLIS_ZZZ: not a variable of millis optimize or of "
                                          r"any millis command \(millis optimize's scoped ones: MILLIS_OPTIMIZE_DATA"):
        config_from_argv(["optimize", "tiny:bert"])


def test_another_commands_variable_is_left_to_it(monkeypatch):
    """One environment serves several commands: MILLIS_PORT (serve's) and MILLIS_TRAIN_PRESET (train's) while
    optimizing are theirs, not an error."""
    monkeypatch.setenv("MILLIS_PORT", "8100")
    monkeypatch.setenv("MILLIS_TRAIN_PRESET", "quick")
    monkeypatch.setenv("MILLIS_OPTIMIZE_PRESET", "quick")
    assert config_from_argv(["optimize", "tiny:bert"])[1].preset == "quick"
    assert config_from_argv(["train", "tiny:bert", "--data", "d.csv"])[1].epochs == 1


def test_every_variable_the_project_reads_is_declared_and_accepted(monkeypatch):
    """MILLIS_DATA (the benches' data), MILLIS_NO_KERNELS, MILLIS_CACHE...: each variable read anywhere in the repo is
    a command's flag or listed in OTHER_VARIABLES, and setting it never makes a command refuse to run."""
    from millis.cli.flags import OTHER_VARIABLES, flags_of
    from millis.cli.main import COMMANDS

    reads = project_reads()
    assert {"MILLIS_DATA", "MILLIS_CACHE", "MILLIS_NO_KERNELS", "MILLIS_KERNEL_ISA"} <= set(reads)  # the scan works
    declared = {v for c in COMMANDS for fl in flags_of(c) for v in fl.variables()}
    missing = {n: f for n, f in reads.items() if n not in declared and n not in OTHER_VARIABLES}
    assert not missing, f"read but neither a flag nor in millis.cli.flags.OTHER_VARIABLES: {missing}"
    values = {"MILLIS_KERNEL_ISA": "scalar", "MILLIS_CACHE": os.environ.get("MILLIS_CACHE", "")}  # usable ones
    for name in OTHER_VARIABLES:
        monkeypatch.setenv(name, values.get(name) or ("0" if name.startswith("MILLIS_NO_") else "x"))
    assert config_from_argv(["optimize", "tiny:bert", "--preset", "quick"])[1].preset == "quick"
    assert config_from_argv(["report", "art"])[1]
