"""`procpoll emulate` for the benchmarks, with Nagle's algorithm off on its connections.

The emulator's handler writes the reply headers and the body in two sends. With Nagle
on, the body waits for the client's delayed ACK of the headers: about 40 ms on Linux,
so an API call configured for 20 ms took 65 ms and every figure measured the stall,
not procpoll. `disable_nagle_algorithm = True` on the handler (the same one-line fix
proposed for procpoll/emulator/server.py) gives replies their configured latency.
Takes exactly the options of `procpoll emulate`.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from procpoll.emulator import server
from procpoll.emulator.command import main

server._Handler.disable_nagle_algorithm = True

if __name__ == "__main__":
    sys.exit(main())
