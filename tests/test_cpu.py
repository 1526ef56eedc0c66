"""A consumer process keeps its threads on one CPU; the commands it starts get every CPU."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from procpoll import cli, cpu
from procpoll.cpu import choose_cpu, pin_process
from procpoll.emulator import Emulator
from tests.conftest import emulator_env, wait_for
from tests.reliability.harness import DaemonProcess, emulator_sections, write_config
from tests.test_daemon import task_event

ALLOWED = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set()
needs_two_cpus = pytest.mark.skipif(
    len(ALLOWED) < 2 or not Path("/proc/self/task").is_dir(),
    reason="needs Linux and at least two CPUs to choose from")


def cpus_of_line(line: str) -> set[int]:
    """The CPUs of a `Cpus_allowed_list:\t0-2,5` line."""
    found: set[int] = set()
    for part in line.split(":", 1)[1].strip().split(","):
        low, _, high = part.partition("-")
        found.update(range(int(low), int(high or low) + 1))
    return found


def cpus_of(status_path: Path) -> set[int]:
    """The CPUs a task may run on, from its status file."""
    for line in status_path.read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            return cpus_of_line(line)
    raise AssertionError(f"no Cpus_allowed_list in {status_path}")


def thread_cpus(pid: int) -> list[set[int]]:
    """Each thread's allowed CPUs."""
    return [cpus_of(task / "status") for task in Path(f"/proc/{pid}/task").iterdir()]


def test_workers_take_the_allowed_cpus_in_turn() -> None:
    """Worker n of a supervisor takes the n-th allowed CPU, wrapping around."""
    allowed = {2, 5, 7}
    assert [choose_cpu(allowed, worker=n, current=5) for n in (1, 2, 3, 4)] == [2, 5, 7, 2]


def test_a_lone_process_stays_on_the_cpu_the_kernel_gave_it() -> None:
    """Without a worker number the current CPU is kept; one not allowed falls to the lowest."""
    assert choose_cpu({0, 1, 2}, worker=None, current=2) == 2
    assert choose_cpu({4, 6}, worker=None, current=1) == 4
    assert choose_cpu({4, 6}, worker=None, current=None) == 4
    with pytest.raises(ValueError, match="no CPU"):
        choose_cpu(set(), worker=None, current=0)


@needs_two_cpus
@pytest.mark.parametrize("pin", [True, False])
def test_daemon_threads_on_one_cpu_and_its_commands_on_all(
        tmp_path: Path, emulator: Emulator, pin: bool) -> None:
    """`procpoll run` moves every thread to the CPU its start line names (pin_cpu = true,
    the default), or leaves them all allowed CPUs (false); a command sink's program gets
    every CPU either way."""
    seen = tmp_path / "command-cpus.txt"
    config = write_config(
        tmp_path / "c.toml",
        emulator_sections(emulator, tmp_path, daemon={"pin_cpu": pin}),
        [{"name": "probe", "type": "command", "timeout": 10,
          "argv": ["sh", "-c", f"grep Cpus_allowed_list /proc/self/status >> {seen}"]}])
    daemon = DaemonProcess(config, tmp_path, emulator_env(emulator)).start()
    try:
        emulator.enqueue([task_event("t-cpu")])
        assert wait_for(lambda: seen.exists() and seen.read_text().strip(), 20), \
            daemon.output()
        started = daemon.events("daemon.started")
        assert len(started) == 1, daemon.output()
        threads = thread_cpus(daemon.pid)
        assert len(threads) > 10  # the dispatch workers, pullers and confirmers are up
        if pin:
            assert started[0]["cpu"] in ALLOWED
            assert all(t == {started[0]["cpu"]} for t in threads), threads
        else:
            assert started[0]["cpu"] is None
            assert all(t == ALLOWED for t in threads), threads
        assert cpus_of_line(seen.read_text().splitlines()[0]) == ALLOWED
    finally:
        daemon.stop()


@needs_two_cpus
def test_a_refusal_part_way_gives_every_thread_its_cpus_back(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """When the system refuses to move one thread (a seccomp filter, a cpuset change), the
    threads already moved get every allowed CPU back and the refusal is raised (the daemon
    logs it and runs unpinned)."""
    calls: list[tuple[int, frozenset[int]]] = []

    def set_affinity(thread_id: int, cpus: set[int] | frozenset[int]) -> None:
        calls.append((thread_id, frozenset(cpus)))
        if len(calls) == 2:
            raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(cpu, "_thread_ids", lambda: [101, 102, 103])
    monkeypatch.setattr(os, "sched_setaffinity", set_affinity)
    monkeypatch.setattr(cpu, "_pinned", None)
    with pytest.raises(PermissionError):
        pin_process(None)
    assert calls[2:] == [(t, frozenset(ALLOWED)) for t in (101, 102, 103)]
    assert cpu._pinned is None  # commands are started as before


@needs_two_cpus
def test_unpinned_gives_a_child_the_cpus_the_process_had(tmp_path: Path) -> None:
    """Inside unpinned() a child starts on every CPU the process had before pinning; the
    thread is back on its CPU afterwards (in a process of its own: pinning is for good)."""
    script = (
        "import os, subprocess\n"
        "from procpoll.cpu import pin_process, unpinned\n"
        "cpu = pin_process(None)\n"
        "grep = ['grep', 'Cpus_allowed_list', '/proc/self/status']\n"
        "outside = subprocess.run(grep, capture_output=True, text=True).stdout\n"
        "with unpinned():\n"
        "    inside = subprocess.run(grep, capture_output=True, text=True).stdout\n"
        "print(cpu, sorted(os.sched_getaffinity(0)), outside.strip(), inside.strip(), sep='|')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=30, check=True, cwd=Path(__file__).resolve().parent.parent)
    chosen, after, outside, inside = done.stdout.strip().split("|")
    assert after == f"[{chosen}]"
    assert cpus_of_line(outside) == {int(chosen)}
    assert cpus_of_line(inside) == ALLOWED


@pytest.fixture(autouse=True)
def _never_pin_the_test_process() -> Iterator[None]:
    """pin_process runs in child processes here; pytest itself keeps every CPU."""
    yield
    if ALLOWED:
        assert os.sched_getaffinity(0) == ALLOWED


def test_a_refused_pin_is_logged_and_the_daemon_runs_on(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`procpoll run` with pin_cpu on a system that refuses: a warning saying what to do,
    no CPU in the start line, no exit."""
    def refuse(_worker: int | None) -> int | None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(cli, "pin_process", refuse)
    with structlog.testing.capture_logs() as logged:
        assert cli._pin("2") is None
    assert [(r["event"], r["log_level"]) for r in logged] == [
        ("daemon.cpu_not_pinned", "warning")]
    assert "pin_cpu = false" in logged[0]["action"]
