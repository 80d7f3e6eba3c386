"""`python -m millis ...`: the `millis` command, as `python -m millis.cli` runs it."""
from millis.cli import __main__  # noqa: F401 -- importing it runs the command
