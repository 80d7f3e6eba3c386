"""`python -m millis.cli`: the `millis` command."""
import sys

from millis.cli.main import main

sys.exit(main())
