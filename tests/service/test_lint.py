"""`procpoll check`: the semantic lint beyond the schema, its output format and --strict."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from procpoll import cli
from procpoll.config import Config, parse_config
from procpoll.lint import filesystem_type, lint, sink_worst_case_s

ROOT_ONLY = "/dev/vda / ext4 rw,relatime 0 0\n"
WITH_RUN_TMPFS = ROOT_ONLY + "tmpfs /run tmpfs rw,nosuid,nodev 0 0\n"


def config(*sinks: dict[str, Any], **sections: dict[str, Any]) -> Config:
    """A valid config with the ledger on a disk path and the given sinks (default: one
    unfiltered file sink that fits the confirm window, so it adds no warning)."""
    document: dict[str, Any] = {"ledger": {"path": "/var/lib/procpoll/ledger.sqlite3"},
                                "sinks": list(sinks) or [file_sink()]}
    for name, table in sections.items():
        document.setdefault(name, {}).update(table)
    return parse_config(document, "procpoll.toml")


def file_sink(name: str = "archive", **keys: Any) -> dict[str, Any]:
    return {"name": name, "type": "file", "path": f"/var/lib/procpoll/{name}.jsonl", **keys}


def keys(cfg: Config, mounts: str = ROOT_ONLY) -> list[str]:
    return [finding.key for finding in lint(cfg, mounts=mounts)]


def test_worst_case_adds_every_timeout_and_capped_backoff() -> None:
    """timeout x (retries + 1) + each backoff doubled from `backoff` up to `backoff_max`."""
    sink = config(file_sink(timeout=1, retries=5, backoff=1, backoff_max=3)).sinks[0]
    assert sink_worst_case_s(sink) == 6 + (1 + 2 + 3 + 3 + 3)


def test_sink_that_cannot_finish_in_the_confirm_window_is_named() -> None:
    """10 s x 4 attempts + 3.5 s backoff exceeds 30 s - 2 s margin: a warning names the sink."""
    findings = lint(config(file_sink("slow", timeout=10)), mounts=ROOT_ONLY)
    assert [f.key for f in findings] == ["sinks[0]"]
    assert "'slow'" in findings[0].what
    assert "43.5 s" in findings[0].what
    assert "28 s" in findings[0].what


def test_sink_inside_the_window_passes() -> None:
    """5 s x 4 attempts + 3.5 s backoff = 23.5 s fits in 28 s."""
    assert keys(config(file_sink(timeout=5))) == []


def test_budget_follows_the_configured_window_and_margin() -> None:
    """A longer confirm_window (emulator setups) makes room for the same sink."""
    cfg = config(file_sink(), vod={"confirm_window": 60})
    assert keys(cfg) == []


def test_sinks_sharing_an_event_do_not_add_up() -> None:
    """The sinks of one event run in parallel: two 23.5 s sinks each fit the 28 s budget."""
    cfg = config(file_sink("a", timeout=5), file_sink("b", timeout=5))
    assert keys(cfg) == []


def test_sinks_with_disjoint_event_filters_do_not_add_up() -> None:
    """No event reaches both sinks, so their worst cases never add."""
    cfg = config(file_sink("a", timeout=5, events=["NewFileUpload"]),
                 file_sink("b", timeout=5, events=["ProcedureStateChanged"]),
                 daemon={"unrouted": "leave"})  # only the budget is under test here
    assert keys(cfg) == []


@pytest.mark.parametrize(("retention_s", "warned"), [(3 * 86_400, True), (4 * 86_400, False)])
def test_ledger_retention_below_four_days_warns(retention_s: int, warned: bool) -> None:
    """The ledger must remember an event as long as VOD may redeliver it (~4 days)."""
    cfg = config(ledger={"retention": retention_s}, daemon={"max_age": 3600})
    assert ("ledger.retention" in keys(cfg)) is warned


def test_max_age_beyond_retention_warns() -> None:
    """A failing event's age is forgotten before it can reach max_age."""
    cfg = config(ledger={"retention": 5 * 86_400}, daemon={"max_age": 6 * 86_400})
    assert keys(cfg) == ["daemon.max_age"]


def test_ledger_on_tmpfs_warns() -> None:
    """A ledger under a tmpfs mount is lost at reboot."""
    cfg = config(ledger={"path": "/run/procpoll/ledger.sqlite3"})
    findings = lint(cfg, mounts=WITH_RUN_TMPFS)
    assert [f.key for f in findings] == ["ledger.path"]
    assert "tmpfs" in findings[0].what


def test_ledger_on_disk_next_to_a_tmpfs_passes() -> None:
    """Only the longest matching mount point counts: /var/lib is on / (ext4), not /run."""
    assert keys(config(), mounts=WITH_RUN_TMPFS) == []


def test_mount_points_with_escaped_spaces_match() -> None:
    """/proc/self/mounts writes a space in a mount point as \\040."""
    mounts = ROOT_ONLY + "tmpfs /mnt/ram\\040disk tmpfs rw 0 0\n"
    assert filesystem_type(Path("/mnt/ram disk/ledger.sqlite3"), mounts) == "tmpfs"
    assert filesystem_type(Path("/mnt/ram/ledger.sqlite3"), mounts) == "ext4"


@pytest.mark.skipif(filesystem_type(Path("/dev/shm/x"), Path("/proc/self/mounts").read_text())
                    != "tmpfs", reason="/dev/shm is not a tmpfs here")
def test_real_mount_table_is_read_by_default() -> None:
    """Without `mounts`, lint reads this machine's mount table."""
    cfg = config(ledger={"path": "/dev/shm/procpoll/ledger.sqlite3"})
    assert [f.key for f in lint(cfg)] == ["ledger.path"]


# --- the command -----------------------------------------------------------------------------


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "procpoll.toml"
    path.write_text(text, encoding="utf-8")
    return path


SLOW_SINK = """
[ledger]
path = "{ledger}"
[[sinks]]
name = "slow"
type = "file"
path = "{ledger}.jsonl"
timeout = 10
"""


def test_check_prints_warnings_and_still_passes(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """Warnings go to stderr as `warning: <file>: <key>: <what>`; exit 0 and `ok` on stdout."""
    path = write(tmp_path, SLOW_SINK.format(ledger=tmp_path / "ledger.sqlite3"))
    assert cli.main(["check", "-c", str(path)]) == cli.EX_OK
    out, err = capsys.readouterr()
    assert out.startswith("ok\n")
    assert err.startswith(f"warning: {path}: sinks[0]: sink 'slow' may need 43.5 s")


def test_check_strict_turns_warnings_into_exit_78(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """--strict: any warning fails the check with EX_CONFIG and no `ok`."""
    path = write(tmp_path, SLOW_SINK.format(ledger=tmp_path / "ledger.sqlite3"))
    assert cli.main(["check", "--strict", "-c", str(path)]) == cli.EX_CONFIG
    out, err = capsys.readouterr()
    assert out == ""
    assert "1 warning" in err


def test_check_strict_passes_a_clean_config(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """--strict without warnings is a plain pass."""
    text = SLOW_SINK.format(ledger=tmp_path / "ledger.sqlite3").replace("timeout = 10",
                                                                         "timeout = 5")
    assert cli.main(["check", "--strict", "-c", str(write(tmp_path, text))]) == cli.EX_OK
    assert "warning:" not in capsys.readouterr().err


@pytest.mark.parametrize("timeout", ["5", "3"])
def test_request_timeout_within_the_long_poll_hold_is_an_error(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], timeout: str) -> None:
    """request_timeout <= 5 s (PullEvents' hold) is an error, with or without --strict."""
    path = write(tmp_path, f"[vod]\nrequest_timeout = {timeout}\n")
    assert cli.main(["check", "-c", str(path)]) == cli.EX_CONFIG
    assert "vod.request_timeout" in capsys.readouterr().err


# --- what unrouted = "confirm" would drop, and names VOD does not document -------------------


def test_unrouted_confirm_names_the_types_no_sink_admits() -> None:
    """Every sink filtered: the documented types none admits would be confirmed unseen."""
    cfg = config(file_sink("a", events=["ProcedureStateChanged"]),
                 file_sink("b", events=["NewFileUpload", "FileDeleted"]))
    [finding] = lint(cfg, mounts=ROOT_ONLY)
    assert finding.key == "daemon.unrouted"
    assert "PullComplete" in finding.what and "TranscodeComplete" in finding.what
    assert "ProcedureStateChanged" not in finding.what
    assert "NewFileUpload" not in finding.what and "FileDeleted" not in finding.what


def test_one_unfiltered_sink_admits_every_type() -> None:
    """A sink without an events filter takes whatever no other sink does: no warning."""
    cfg = config(file_sink("a", timeout=1, events=["ProcedureStateChanged"]),
                 file_sink("b", timeout=1))
    assert keys(cfg) == []


def test_unrouted_leave_does_not_warn_about_unrouted_types() -> None:
    """With "leave" nothing is confirmed undelivered."""
    cfg = config(file_sink("a", events=["ProcedureStateChanged"]), daemon={"unrouted": "leave"})
    assert keys(cfg) == []


def test_event_type_vod_does_not_document_warns() -> None:
    """A name far from every known type is allowed (VOD adds types) but named by `check`."""
    cfg = config(file_sink("a", timeout=1, events=["MyCustomEvent", "ProcedureStateChanged"]),
                 file_sink("b", timeout=1))
    [finding] = lint(cfg, mounts=ROOT_ONLY)
    assert finding.key == "sinks[0].events"
    assert finding.what.startswith("'MyCustomEvent' is not an event type VOD documents")
