"""`python -m procpoll` runs the command-line interface."""

import sys

from procpoll.cli import main

sys.exit(main())
