"""`millis`: assembles the sub-commands (one module each) and runs the one asked for.

Flags and MILLIS_* variables come from the config dataclasses (millis.cli.flags); a bad value, like
any MillisError, is one line on stderr and exit status 2.
"""
from __future__ import annotations

import csv
import os
import signal
import sys
from typing import Any

from millis.cli import artifact, evaluate, generate, optimize, report, serve, train
from millis.cli.flags import Command, parse
from millis.common.errors import MillisError

COMMANDS: tuple[Command, ...] = (optimize.COMMAND, train.TRAIN, train.DISTILL, train.PRUNE, evaluate.COMMAND,
                                 artifact.INFO, artifact.PREDICT, report.COMMAND, serve.SERVE, serve.BENCH,
                                 generate.COMMAND)


def config_from_argv(argv: list[str]) -> tuple[Command, Any]:
    """argv and the MILLIS_* variables -> the command and the config it runs with: all of `main` but the run."""
    return parse(COMMANDS, argv)


def main(argv: list[str] | None = None) -> int:
    try:
        command, cfg = config_from_argv(sys.argv[1:] if argv is None else list(argv))
        return command.run(cfg)
    except MillisError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `millis generate --stream | head`: the reader left; stop quietly, as Unix tools do
        try:  # stdout at /dev/null, so that the interpreter's flush at exit does not raise again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):  # a stdout with no descriptor (a test's capture)
            pass
        return 128 + signal.SIGPIPE  # what a tool killed by SIGPIPE reports
    except (OSError, UnicodeError, csv.Error) as e:  # the last resort: a file or text problem no check caught
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
