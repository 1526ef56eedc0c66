"""A local Tencent Cloud VOD API emulator for demos, tests and benchmarks."""

from procpoll.emulator.event_files import EventFileError, load_events
from procpoll.emulator.faults import Fault
from procpoll.emulator.generator import generate_events
from procpoll.emulator.service import Emulator

__all__ = ["Emulator", "EventFileError", "Fault", "generate_events", "load_events"]
