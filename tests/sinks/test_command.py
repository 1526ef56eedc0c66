"""The command sink against real subprocesses: stdin, environment, exit statuses, hostile input."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from procpoll.errors import SinkError
from procpoll.events import Event, parse_callback_body
from procpoll.sinks import build_sink
from procpoll.sinks.command import (
    ENV_VALUE_MAX_CHARS,
    OUTPUT_TAIL_BYTES,
    CommandOptions,
    CommandSink,
    env_value,
)
from tests.conftest import wait_for
from tests.sinks.conftest import config_problems, delivery, load_event, procedure_event, sink_config

# Records what the command received: stdin bytes, argv, environment and working directory.
RECORD = r"""
import json, os, sys
out = sys.argv[1]
data = sys.stdin.buffer.read()
name = os.environ.get("PROCPOLL_EVENT_KEY", "run")
with open(os.path.join(out, name + ".stdin"), "wb") as f:
    f.write(data)
with open(os.path.join(out, name + ".json"), "w") as f:
    json.dump({"argv": sys.argv[2:], "env": dict(os.environ), "cwd": os.getcwd()}, f)
"""


def python(code: str, *args: str) -> list[str]:
    """argv running `code` in this interpreter."""
    return [sys.executable, "-c", code, *args]


def recording_sink(out: Path, *extra_argv: str, **keys: Any) -> CommandSink:
    """A command sink whose command records what it got into `out`."""
    sink = build_sink(sink_config("command", argv=python(RECORD, str(out), *extra_argv), **keys))
    assert isinstance(sink, CommandSink)
    return sink


def recorded(out: Path, event: Event) -> tuple[bytes, dict[str, Any]]:
    """What the recording command got for `event`: stdin bytes and {argv, env, cwd}."""
    info = json.loads((out / f"{event.key}.json").read_text(encoding="utf-8"))
    return (out / f"{event.key}.stdin").read_bytes(), info


def run(argv: list[str], event: Event | None = None, timeout_s: float = 10.0) -> None:
    """Deliver one event to a command sink running `argv`."""
    sink = CommandSink("t", CommandOptions(argv=tuple(argv)))
    sink.deliver(delivery(event or procedure_event(), timeout_s=timeout_s))


def gone(pid: int) -> bool:
    """Whether `pid` has exited (a zombie left to an init that does not reap counts)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in {"Z", "X"}


def test_stdin_is_the_callback_body_then_eof(tmp_path: Path) -> None:
    """The command reads exactly the normal-callback JSON from stdin, then end-of-file."""
    event = load_event("ProcedureStateChanged-transcode-hls.json")
    recording_sink(tmp_path).deliver(delivery(event))
    stdin, _ = recorded(tmp_path, event)
    assert stdin == event.callback_body()
    assert json.loads(stdin) == dict(event.raw)


def test_environment_describes_a_procedure_event(tmp_path: Path) -> None:
    """PROCPOLL_* name the event type, key, sub-app, attempt, task, file and status."""
    event = procedure_event("1256-Procedure-env", "PROCESSING")
    recording_sink(tmp_path).deliver(delivery(event, sub_app_id=1400000001, attempt=3))
    env = recorded(tmp_path, event)[1]["env"]
    assert {k: v for k, v in env.items() if k.startswith("PROCPOLL_")} == {
        "PROCPOLL_EVENT_TYPE": "ProcedureStateChanged",
        "PROCPOLL_EVENT_KEY": event.key,
        "PROCPOLL_DELIVERY_ID": event.key,
        "PROCPOLL_SUB_APP_ID": "1400000001",
        "PROCPOLL_ATTEMPT": "3",
        "PROCPOLL_TASK_ID": "1256-Procedure-env",
        "PROCPOLL_FILE_ID": "5285890784246869930",
        "PROCPOLL_STATUS": "PROCESSING",
    }


def test_other_events_get_no_task_variables(tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """For other types the task variables are absent, even if the daemon's own env had them."""
    monkeypatch.setenv("PROCPOLL_TASK_ID", "stale")
    event = load_event("NewFileUpload-basic.json")
    recording_sink(tmp_path).deliver(delivery(event))
    env = recorded(tmp_path, event)[1]["env"]
    assert env["PROCPOLL_EVENT_TYPE"] == "NewFileUpload"
    assert env["PROCPOLL_SUB_APP_ID"] == "0"
    assert not {"PROCPOLL_TASK_ID", "PROCPOLL_FILE_ID", "PROCPOLL_STATUS"} & env.keys()


def test_configured_env_and_cwd_reach_the_command(tmp_path: Path) -> None:
    """`env` is added to the environment and the command runs in `cwd`."""
    workdir = tmp_path / "work"
    workdir.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    event = procedure_event()
    recording_sink(out, env={"APP_ENV": "staging"}, cwd=str(workdir)).deliver(delivery(event))
    info = recorded(out, event)[1]
    assert info["env"]["APP_ENV"] == "staging"
    assert Path(info["cwd"]) == workdir


def test_vod_credentials_are_not_inherited(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """TENCENTCLOUD_* stay with the daemon; the rest of its environment is inherited."""
    monkeypatch.setenv("TENCENTCLOUD_SECRET_KEY", "do-not-leak")
    monkeypatch.setenv("SINKTEST_INHERITED", "yes")
    event = procedure_event()
    recording_sink(tmp_path).deliver(delivery(event))
    env = recorded(tmp_path, event)[1]["env"]
    assert "TENCENTCLOUD_SECRET_KEY" not in env
    assert env["SINKTEST_INHERITED"] == "yes"


def test_argv_reaches_the_command_literally(tmp_path: Path) -> None:
    """Arguments are passed as configured: no placeholders, globs or variables are expanded."""
    literal = ["{TaskId}", "$PROCPOLL_TASK_ID", "*", "$(id)", "a b", ""]
    event = procedure_event()
    recording_sink(tmp_path, *literal).deliver(delivery(event))
    assert recorded(tmp_path, event)[1]["argv"] == literal


HOSTILE = {
    "single quotes": "a'; touch {marker}; echo '",
    "double quotes": 'a"; touch {marker}; echo "',
    "command substitution": "$(touch {marker})",
    "backticks": "`touch {marker}`",
    "newlines": "a\ntouch {marker}\n",
    "NUL": "a\0b$(touch {marker})",
    "semicolon and pipe": "x; touch {marker} | cat &",
    "200 KB": "$(touch {marker})" + "n" * 200_000,
}


@pytest.mark.parametrize("field", ["FileName", "TaskId", "FileId"])
@pytest.mark.parametrize("value", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_fields_reach_stdin_intact_and_no_shell(tmp_path: Path, field: str,
                                                        value: str) -> None:
    """Hostile event fields run nothing, arrive byte-exact on stdin and cannot break the call."""
    marker = tmp_path / "injected"
    out = tmp_path / "out"
    out.mkdir()
    event = procedure_event(**{field: value.replace("{marker}", str(marker))})
    recording_sink(out).deliver(delivery(event))
    stdin, info = recorded(out, event)
    assert stdin == event.callback_body()
    assert json.loads(stdin)["ProcedureStateChangeEvent"][field] == \
        value.replace("{marker}", str(marker))
    env_name = {"TaskId": "PROCPOLL_TASK_ID", "FileId": "PROCPOLL_FILE_ID"}.get(field)
    if env_name:
        assert info["env"][env_name] == env_value(value.replace("{marker}", str(marker)))
    assert not marker.exists()


def test_env_value_drops_nul_and_is_bounded() -> None:
    """Event fields in the environment lose NUL and stop at ENV_VALUE_MAX_CHARS."""
    assert env_value("a\0b") == "ab"
    assert len(env_value("x" * 300_000)) == ENV_VALUE_MAX_CHARS
    assert env_value("\ud800") == "\\ud800"


def test_exit_75_is_a_retryable_failure() -> None:
    """Exit 75 (EX_TEMPFAIL) asks for a retry."""
    with pytest.raises(SinkError) as info:
        run(python("import sys; print('busy', file=sys.stderr); sys.exit(75)"))
    assert info.value.retryable
    assert info.value.reason == "exit status 75 (EX_TEMPFAIL): busy"


@pytest.mark.parametrize("status", [1, 2, 64, 78, 255])
def test_other_exit_statuses_are_permanent_failures(status: int) -> None:
    """Any non-zero status but 75 fails the delivery without retry (it counts to max_attempts)."""
    with pytest.raises(SinkError) as info:
        run(python(f"import sys; sys.exit({status})"))
    assert not info.value.retryable
    assert info.value.reason == f"exit status {status}"


def test_death_by_signal_is_a_permanent_failure() -> None:
    """A command killed by a signal fails without retry, naming the signal."""
    with pytest.raises(SinkError) as info:
        run(python("import os, signal; os.kill(os.getpid(), signal.SIGTERM)"))
    assert not info.value.retryable
    assert info.value.reason == "killed by SIGTERM"


def test_missing_program_is_a_clear_permanent_failure(tmp_path: Path) -> None:
    """A program that does not exist fails without retry and says which."""
    with pytest.raises(SinkError) as info:
        run([str(tmp_path / "no-such-hook")])
    assert not info.value.retryable
    assert info.value.reason == f"program not found: {tmp_path / 'no-such-hook'}"


def test_missing_cwd_is_a_clear_permanent_failure(tmp_path: Path) -> None:
    """A working directory that does not exist fails without retry and says so."""
    sink = CommandSink("t", CommandOptions(argv=("true",), cwd=tmp_path / "gone"))
    with pytest.raises(SinkError) as info:
        sink.deliver(delivery(procedure_event()))
    assert not info.value.retryable
    assert info.value.reason == f"working directory not found: {tmp_path / 'gone'}"


def test_program_is_found_on_path_and_may_ignore_stdin() -> None:
    """A bare name is looked up in PATH; a command that never reads a 200 KB stdin succeeds."""
    run(["true"], procedure_event(FileName="n" * 200_000))


def test_timeout_kills_the_whole_process_group(tmp_path: Path) -> None:
    """At the timeout the command and its children are killed and the failure is retryable."""
    pids = tmp_path / "pids"
    script = f'sleep 60 & echo $! > {pids}.tmp; echo $$ >> {pids}.tmp; mv {pids}.tmp {pids}; wait'
    started = time.monotonic()
    with pytest.raises(SinkError) as info:
        run(["sh", "-c", script], timeout_s=1.0)
    assert time.monotonic() - started < 8
    assert info.value.retryable
    assert info.value.reason == "timed out after 1 s; process group killed"
    numbers = [int(p) for p in pids.read_text().split()]
    assert len(numbers) == 2
    try:
        assert wait_for(lambda: all(gone(pid) for pid in numbers), timeout_s=5)
    finally:
        for pid in numbers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_background_child_holding_stdout_does_not_hold_the_delivery(tmp_path: Path) -> None:
    """Once the command itself exits 0 the delivery succeeds, though a child keeps its pipes."""
    pid_file = tmp_path / "pid"
    started = time.monotonic()
    try:
        run(["sh", "-c", f"sleep 60 & echo $! > {pid_file}; echo done"], timeout_s=20)
        assert time.monotonic() - started < 10
    finally:
        if pid_file.exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid_file.read_text()), signal.SIGKILL)


def test_output_is_bounded_and_logged(log_lines: Callable[[], list[dict[str, Any]]]) -> None:
    """Only the last OUTPUT_TAIL_BYTES of each stream are kept; the log gives the full size."""
    code = ("import sys; sys.stdout.write('x' * 1_000_000 + 'END'); "
            "print('warning: slow disk', file=sys.stderr)")
    run(python(code))
    [line] = [x for x in log_lines() if x["event"] == "sink.command_output"]
    assert line["level"] == "info"
    assert line["exit_status"] == 0
    assert line["stdout_bytes"] == 1_000_003
    assert len(line["stdout"]) == OUTPUT_TAIL_BYTES
    assert line["stdout"].endswith("xEND")
    assert line["stderr"] == "warning: slow disk\n"


def test_output_of_a_failed_command_is_logged_as_a_warning(
        log_lines: Callable[[], list[dict[str, Any]]]) -> None:
    """A failing command's output is logged at warning level with its exit status."""
    with pytest.raises(SinkError):
        run(python("import sys; print('no such bucket', file=sys.stderr); sys.exit(3)"))
    [line] = [x for x in log_lines() if x["event"] == "sink.command_output"]
    assert (line["level"], line["exit_status"], line["stderr"]) == \
        ("warning", 3, "no such bucket\n")
    assert "stdout" not in line


def test_silent_command_logs_nothing(log_lines: Callable[[], list[dict[str, Any]]]) -> None:
    """A command that prints nothing adds no output line to the log."""
    run(["true"])
    assert not [x for x in log_lines() if x["event"] == "sink.command_output"]


def test_concurrent_deliveries_each_get_their_own_event(tmp_path: Path) -> None:
    """Deliveries from many worker threads at once each feed their own event to their process."""
    sink = recording_sink(tmp_path)
    events = [procedure_event(f"task-{n}") for n in range(16)]
    errors: list[BaseException] = []

    def deliver(event: Event) -> None:
        try:
            sink.deliver(delivery(event))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=deliver, args=(e,)) for e in events]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors
    for event in events:
        stdin, info = recorded(tmp_path, event)
        assert stdin == event.callback_body()
        assert info["env"]["PROCPOLL_TASK_ID"] == event.task_id


def test_close_kills_running_commands(tmp_path: Path) -> None:
    """close() kills a command still running; its delivery fails retryably, without waiting."""
    started = tmp_path / "started"
    sink = CommandSink("t", CommandOptions(argv=("sh", "-c", f"touch {started}; sleep 60")))
    errors: list[SinkError] = []

    def deliver() -> None:
        try:
            sink.deliver(delivery(procedure_event(), timeout_s=60))
        except SinkError as exc:
            errors.append(exc)

    thread = threading.Thread(target=deliver)
    thread.start()
    assert wait_for(started.exists)
    sink.close()
    thread.join(10)
    assert not thread.is_alive()
    assert [(e.reason, e.retryable) for e in errors] == [("stopped by shutdown", True)]


def test_command_events_can_be_parsed_back(tmp_path: Path) -> None:
    """What the command reads parses back into the same event (same key)."""
    event = load_event("ProcedureStateChanged-aianalysis.json")
    recording_sink(tmp_path).deliver(delivery(event))
    stdin, _ = recorded(tmp_path, event)
    assert parse_callback_body(json.loads(stdin)).key == event.key


@pytest.mark.parametrize(("keys", "problem"), [
    ({}, "sinks[0].argv: expected a non-empty list of strings, the program first"),
    ({"argv": []}, "sinks[0].argv: expected a non-empty list of strings, the program first"),
    ({"argv": "/bin/hook --x"}, 'sinks[0].argv: expected a list like ["/usr/local/bin/'
                                'on-vod-event", "--verbose"]: no shell splits a command line'),
    ({"argv": ["/bin/hook", 3]},
     "sinks[0].argv: expected a non-empty list of strings, the program first"),
    ({"argv": [""]}, "sinks[0].argv: the program (argv[0]) must not be empty"),
    ({"argv": ["/bin/hook", "a\0b"]}, "sinks[0].argv: arguments cannot contain NUL"),
    ({"argv": ["/bin/hook"], "env": {"A": 1}}, "sinks[0].env: expected a table of strings"),
    ({"argv": ["/bin/hook"], "env": {"PROCPOLL_X": "1"}},
     "sinks[0].env.PROCPOLL_X: PROCPOLL_* variables are set by procpoll for each event"),
    ({"argv": ["/bin/hook"], "env": {"A": "x\0"}},
     "sinks[0].env.A: an environment value cannot contain NUL"),
    ({"argv": ["/bin/hook"], "cwd": ""}, "sinks[0].cwd: expected a non-empty path"),
    ({"argv": ["/bin/hook"], "shell": True}, "sinks[0].shell: unknown key"),
])
def test_config_problems_name_the_key(keys: dict[str, Any], problem: str) -> None:
    """Each invalid command-sink key is reported with its dotted path and what was expected."""
    assert config_problems("command", **keys) == [f"<test>: {problem}"]


def test_config_reads_argv_env_and_cwd() -> None:
    """A valid table becomes CommandOptions with argv as a tuple and cwd as a Path."""
    config = sink_config("command", argv=["/usr/bin/hook", "--x"], env={"A": "1"}, cwd="/srv")
    assert config.options == CommandOptions(argv=("/usr/bin/hook", "--x"), env={"A": "1"},
                                            cwd=Path("/srv"))
