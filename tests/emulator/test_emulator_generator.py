"""Generated events look like VOD's samples and stress consumers; event files load."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from procpoll.emulator import EventFileError, generate_events, load_events
from procpoll.emulator.media_outputs import MEDIA_PROCESS_TYPES

PAYLOADS = Path(__file__).resolve().parents[1] / "data" / "payloads"


@pytest.fixture(scope="module")
def events() -> list[dict[str, Any]]:
    """300 events from a fixed seed."""
    return generate_events(300, seed=2024)


def procedures(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [
        e["ProcedureStateChangeEvent"] for e in events if e["EventType"] == "ProcedureStateChanged"
    ]


def test_count_and_reproducibility() -> None:
    """Exactly n bodies; the same seed gives the same list, another seed a different one."""
    assert len(generate_events(57, seed=1)) == 57
    assert generate_events(20, seed=1) == generate_events(20, seed=1)
    assert generate_events(20, seed=1) != generate_events(20, seed=2)
    assert generate_events(0, seed=1) == []


def test_every_body_is_distinct(events: list[dict[str, Any]]) -> None:
    """No two generated bodies serialize alike, so their content hashes differ."""
    assert len({json.dumps(e, sort_keys=True) for e in events}) == len(events)


def test_mostly_procedure_state_changed_plus_other_types(events: list[dict[str, Any]]) -> None:
    """~80% ProcedureStateChanged, plus NewFileUpload, FileDeleted and a type VOD lacks."""
    kinds = Counter(e["EventType"] for e in events)
    assert 0.7 <= kinds["ProcedureStateChanged"] / len(events) <= 0.9
    assert {"NewFileUpload", "FileDeleted", "HologramRenderComplete"} <= set(kinds)
    hologram = next(e for e in events if e["EventType"] == "HologramRenderComplete")
    assert set(hologram) == {"EventType", "HologramRenderCompleteEvent"}


def test_procedures_have_the_real_shape(events: list[dict[str, Any]]) -> None:
    """ProcedureTask fields as in the samples: TaskId prefix, numeric FileId, MetaData."""
    for task in procedures(events):
        assert task["TaskId"].startswith("1400155958-procedurev2-")
        assert task["FileId"].isdigit()
        assert task["Status"] in {"FINISH", "PROCESSING"}
        assert {"Duration", "Size", "VideoStreamSet"} <= set(task["MetaData"])


def test_all_seven_media_process_types_with_failures(events: list[dict[str, Any]]) -> None:
    """MediaProcessResultSet draws all seven types; some sub-tasks FAIL with error details."""
    results = [r for task in procedures(events) for r in task["MediaProcessResultSet"]]
    assert {r["Type"] for r in results} == set(MEDIA_PROCESS_TYPES)
    tasks = [next(v for k, v in r.items() if k != "Type") for r in results]
    failed = [t for t in tasks if t["Status"] == "FAIL"]
    assert failed
    assert all(t["ErrCode"] != 0 and t["ErrCodeExt"] and t["Message"] for t in failed)
    assert sum(t["Status"] == "SUCCESS" for t in tasks) > len(failed)


def test_ai_result_sets_appear(events: list[dict[str, Any]]) -> None:
    """Some procedures carry AiContentReview, AiAnalysis and AiRecognition result sets."""
    keys = {key for task in procedures(events) for key in task}
    assert {"AiContentReviewResultSet", "AiAnalysisResultSet", "AiRecognitionResultSet"} <= keys


def test_processing_precedes_finish_of_the_same_task(events: list[dict[str, Any]]) -> None:
    """Every PROCESSING event is followed, later in the list, by a FINISH of its TaskId."""
    tasks = procedures(events)
    processing = [i for i, t in enumerate(tasks) if t["Status"] == "PROCESSING"]
    assert processing
    for index in processing:
        task_id = tasks[index]["TaskId"]
        assert any(t["TaskId"] == task_id and t["Status"] == "FINISH" for t in tasks[index + 1 :])


def test_file_names_include_non_ascii_and_hostile_text(events: list[dict[str, Any]]) -> None:
    """File names cover Chinese, emoji, shell metacharacters, newlines and very long names."""
    names = {t["FileName"] for t in procedures(events)}
    joined = "".join(names)
    assert any("\u4e00" <= ch <= "\u9fff" for ch in joined)
    assert any(ord(ch) > 0xFFFF for ch in joined)
    assert "$(rm -rf /)" in names
    assert any("`" in n for n in names)
    assert any("\n" in n for n in names)
    assert any(len(n) > 255 for n in names)


def test_load_json_list_and_json_lines(tmp_path: Path) -> None:
    """A JSON list and a JSON-lines file of bodies load in file order."""
    bodies = generate_events(4, seed=5)
    as_list = tmp_path / "events.json"
    as_list.write_text(json.dumps(bodies, ensure_ascii=False), encoding="utf-8")
    as_lines = tmp_path / "events.jsonl"
    as_lines.write_text("\n".join(json.dumps(b) for b in bodies) + "\n\n", encoding="utf-8")
    assert load_events(as_list) == bodies
    assert load_events(str(as_lines)) == bodies


def test_load_pull_events_response_strips_handles() -> None:
    """A real PullEvents response file loads as its EventSet without EventHandle keys."""
    loaded = load_events(PAYLOADS / "PullEvents-response-4events-apidoc.json")
    assert len(loaded) == 4
    assert all("EventHandle" not in body for body in loaded)
    assert loaded[0]["EventType"] == "ProcedureStateChanged"


def test_load_single_normal_callback_body() -> None:
    """A file holding one normal-callback body loads as a one-item list."""
    loaded = load_events(PAYLOADS / "NewFileUpload-basic.json")
    assert [body["EventType"] for body in loaded] == ["NewFileUpload"]


@pytest.mark.parametrize("content", ["[1, 2]", '{"a": 1}\nnot json\n', '"text"'])
def test_malformed_event_files_are_refused(tmp_path: Path, content: str) -> None:
    """Non-object items, broken JSON lines and scalars raise EventFileError naming the file."""
    path = tmp_path / "bad.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(EventFileError, match=r"bad\.json"):
        load_events(path)
