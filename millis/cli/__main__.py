import sys

from millis.cli.main import main

sys.exit(main())
