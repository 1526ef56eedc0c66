"""`python -m procpoll.emulator` runs the emulator command stand-alone."""

import sys

from procpoll.emulator.command import main

sys.exit(main())
