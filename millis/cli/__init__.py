"""`millis` command line: one flags module, one module per command."""
from millis.cli.main import main

__all__ = ["main"]
