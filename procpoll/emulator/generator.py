"""Synthetic normal-callback bodies shaped like VOD's published samples, reproducible by seed.

About 80% are ProcedureStateChanged (some PROCESSING, each followed later by the FINISH of
the same TaskId; sub-tasks drawn from all seven media-process types, some FAILed, some AI
result sets), the rest NewFileUpload, FileDeleted and HologramRenderComplete, a type VOD
does not have, standing in for whatever VOD adds next. File names include non-ASCII and
hostile text. Every body is distinct: FileIds and TaskIds are never reused across tasks.
"""

from __future__ import annotations

import copy
import random
from datetime import UTC, datetime, timedelta
from typing import Any

from procpoll.emulator.media_outputs import MEDIA_PROCESS_TYPES, TASK_KEY, media_output

APP_ID = 1400155958
_MEDIA_HOST = f"https://{APP_ID}.vod2.myqcloud.com"
_EPOCH = datetime(2025, 1, 6, 8, 0, tzinfo=UTC)

FILE_NAMES = (
    "Animal World",
    "lecture-01.mp4",
    "动物世界 第一集",
    "课程回放（2025-03-01）",  # noqa: RUF001 - full-width brackets are normal in Chinese
    "東京の夜景",
    "🎬 trailer 🍿 final",
    "مرحبا بالعالم",
    'O\'Brien "quoted" clip',
    "$(rm -rf /)",
    "`reboot`",
    "line one\nline two\r\nline three",
    "'; DROP TABLE events; --",
    "../../etc/passwd",
    "%s%n{0}{{name}}",
    "\u202egnp.exe",
    "\x1b[31mred alert\x1b[0m",
    "tab\tseparated\tname",
    "长" * 120 + "-" + "x" * 200,
)
# ErrCode / ErrCodeExt / Message triples seen in VOD's error-code table.
_FAILURES = (
    (40000, "InvalidInput", "Invalid input: the source file is not a media file."),
    (70000, "InternalError", "Internal error, please retry."),
    (30010, "SourceFileError", "The source file is damaged."),
    (10000, "InvalidParameterValue.Definition", "The template does not exist."),
)
_UNKNOWN_SHARE = 0.05
_UPLOAD_SHARE = 0.08
_DELETE_SHARE = 0.07
_PROCESSING_SHARE = 0.15
_FAIL_SHARE = 0.12


def generate_events(n: int, seed: int | None = None) -> list[dict[str, Any]]:
    """`n` distinct normal-callback bodies; the same `seed` gives the same list."""
    if n < 0:
        raise ValueError(f"n must be >= 0, not {n}")
    return _Generator(random.Random(seed)).events(n)  # noqa: S311 - test data, not secrets


class _Generator:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.file_base = 5285890784000000000 + rng.randrange(10**12)
        self.counter = 0
        self.procedures = 0

    def events(self, n: int) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        later: list[tuple[int, dict[str, Any]]] = []  # (position due, FINISH body)
        while len(out) < n:
            later.sort(key=lambda item: item[0])
            if later and (later[0][0] <= len(out) or n - len(out) <= len(later)):
                out.append(later.pop(0)[1])
                continue
            roll = self.rng.random()
            if roll < _UNKNOWN_SHARE:
                out.append(self.hologram(len(out)))
            elif roll < _UNKNOWN_SHARE + _UPLOAD_SHARE:
                out.append(self.new_file_upload(len(out)))
            elif roll < _UNKNOWN_SHARE + _UPLOAD_SHARE + _DELETE_SHARE:
                out.append(self.file_deleted())
            elif self.rng.random() < _PROCESSING_SHARE and n - len(out) >= len(later) + 2:
                processing, finish = self.procedure_pair()
                out.append(processing)
                later.append((len(out) + self.rng.randint(0, 4), finish))
            else:
                out.append(self.procedure())
        return out

    # -- identifiers -----------------------------------------------------------------

    def file_id(self) -> str:
        self.counter += 1
        return str(self.file_base + self.counter * 1000 + self.rng.randrange(1000))

    def task_id(self, kind: str) -> str:
        return f"{APP_ID}-{kind}-{self.rng.getrandbits(128):032x}"

    def time(self, position: int) -> str:
        moment = _EPOCH + timedelta(seconds=position * 7 + self.rng.randrange(7))
        return moment.strftime("%Y-%m-%dT%H:%M:%SZ")

    def url(self, suffix: str) -> str:
        return f"{_MEDIA_HOST}/{self.rng.getrandbits(32):08x}vodcq{APP_ID}/{suffix}"

    # -- ProcedureStateChanged ---------------------------------------------------------

    def procedure(self) -> dict[str, Any]:
        self.procedures += 1
        event = self.procedure_base()
        event["MediaProcessResultSet"] = self.media_results(event["MetaData"])
        self.add_ai_results(event)
        return _procedure_body(event, explicit_nulls=self.rng.random() < 0.1)

    def procedure_pair(self) -> tuple[dict[str, Any], dict[str, Any]]:
        self.procedures += 1
        finish = self.procedure_base()
        finish["MediaProcessResultSet"] = self.media_results(finish["MetaData"])
        self.add_ai_results(finish)
        processing = copy.deepcopy({k: v for k, v in finish.items() if not k.startswith("Ai")})
        processing["Status"] = "PROCESSING"
        processing["TasksNotifyMode"] = "Change"
        processing["MediaProcessResultSet"] = [
            _still_processing(result) for result in finish["MediaProcessResultSet"]
        ]
        finish["TasksNotifyMode"] = "Change"
        return _procedure_body(processing, False), _procedure_body(finish, False)

    def procedure_base(self) -> dict[str, Any]:
        event: dict[str, Any] = {
            "TaskId": self.task_id("procedurev2"),
            "Status": "FINISH",
        }
        if self.rng.random() < 0.5:
            event["ErrCode"] = 0
            event["Message"] = ""
        file_id = self.file_id()
        event.update(
            {
                "FileId": file_id,
                "FileName": self.rng.choice(FILE_NAMES),
                "FileUrl": self.url(f"{file_id[-6:]}.mp4"),
                "MetaData": self.metadata(),
                "TasksPriority": self.rng.choice((0, 0, 0, 10, -10)),
                "TasksNotifyMode": self.rng.choice(("", "", "Finish")),
                "SessionContext": "",
                "SessionId": "",
            }
        )
        return event

    def metadata(self) -> dict[str, Any]:
        width, height = self.rng.choice(((640, 480), (1280, 720), (1920, 1080), (720, 1280)))
        duration = round(self.rng.uniform(3, 3600), 3)
        video_bitrate = self.rng.randrange(300_000, 8_000_000)
        audio_bitrate = self.rng.choice((64_000, 128_000, 383_854))
        return {
            "AudioDuration": duration,
            "AudioStreamSet": [{"Bitrate": audio_bitrate, "Codec": "aac", "SamplingRate": 48000}],
            "Bitrate": video_bitrate + audio_bitrate,
            "Container": "mov,mp4,m4a,3gp,3g2,mj2",
            "Duration": duration,
            "Height": height,
            "Rotate": self.rng.choice((0, 0, 0, 90)),
            "Size": int((video_bitrate + audio_bitrate) * duration / 8),
            "VideoDuration": duration,
            "VideoStreamSet": [
                {
                    "Bitrate": video_bitrate,
                    "Codec": self.rng.choice(("h264", "h264", "hevc")),
                    "Fps": self.rng.choice((24, 25, 30, 60)),
                    "Height": height,
                    "Width": width,
                }
            ],
            "Width": width,
        }

    def media_results(self, meta: dict[str, Any]) -> list[dict[str, Any]]:
        # Cycling the first type guarantees all seven appear once seven procedures exist.
        first = MEDIA_PROCESS_TYPES[self.procedures % len(MEDIA_PROCESS_TYPES)]
        others = self.rng.sample(MEDIA_PROCESS_TYPES, self.rng.randint(0, 3))
        kinds = [first, *(kind for kind in others if kind != first)]
        return [self.media_result(kind, meta) for kind in kinds]

    def media_result(self, kind: str, meta: dict[str, Any]) -> dict[str, Any]:
        definition = self.rng.choice((10, 20, 30, 100010, 100020))
        task: dict[str, Any] = {
            "Status": "SUCCESS",
            "ErrCode": 0,
            "Message": self.rng.choice(("", "SUCCESS")),
            "Input": {"Definition": definition},
        }
        if self.rng.random() < _FAIL_SHARE:
            code, ext, message = self.rng.choice(_FAILURES)
            task.update({"Status": "FAIL", "ErrCode": code, "ErrCodeExt": ext, "Message": message})
            task["Output"] = None
        else:
            task["Output"] = media_output(kind, definition, meta, rng=self.rng, url=self.url)
        return {"Type": kind, TASK_KEY[kind]: task}

    def add_ai_results(self, event: dict[str, Any]) -> None:
        # Cycling by procedure count guarantees each AI result set appears; a few more at random.
        slot = self.procedures % 5
        if slot == 1 or self.rng.random() < 0.05:
            porn = {"Confidence": 98, "Suggestion": "block", "Label": "sexy", "SegmentSet": []}
            passed = {"Confidence": 0, "Suggestion": "pass", "SegmentSet": []}
            event["AiContentReviewResultSet"] = [
                _ai_task("Porn", porn),
                _ai_task("Terrorism", passed),
                _ai_task("Political", passed),
            ]
        if slot == 2 or self.rng.random() < 0.05:
            classes = [{"Classification": "Animals", "Confidence": self.rng.randrange(50, 100)}]
            tags = [{"Tag": "Horse", "Confidence": 34}, {"Tag": "鸟", "Confidence": 27}]
            event["AiAnalysisResultSet"] = [
                _ai_task("Classification", {"ClassificationSet": classes}),
                _ai_task("Tag", {"TagSet": tags}),
            ]
        if slot == 3 or self.rng.random() < 0.05:
            segment = {
                "StartTimeOffset": 10,
                "EndTimeOffset": 12,
                "Confidence": 97,
                "AreaCoordSet": [830, 783, 1030, 599],
            }
            face = {
                "Id": self.rng.randrange(100000, 999999),
                "Type": "Default",
                "Name": "张三",
                "SegmentSet": [segment],
            }
            event["AiRecognitionResultSet"] = [
                _ai_task("FaceRecognition", {"ResultSet": [face]}),
            ]

    # -- other event types ------------------------------------------------------------

    def new_file_upload(self, position: int) -> dict[str, Any]:
        file_id = self.file_id()
        created = self.time(position)
        return {
            "EventType": "NewFileUpload",
            "FileUploadEvent": {
                "FileId": file_id,
                "MediaBasicInfo": {
                    "Name": self.rng.choice(FILE_NAMES),
                    "Description": "",
                    "CreateTime": created,
                    "UpdateTime": created,
                    "ExpireTime": "9999-12-31T23:59:59Z",
                    "ClassId": 0,
                    "ClassName": "Other",
                    "ClassPath": "Other",
                    "CoverUrl": "",
                    "Type": "mp4",
                    "MediaUrl": self.url(f"{file_id[-8:]}.mp4"),
                    "TagSet": [],
                    "StorageRegion": "ap-guangzhou-2",
                    "SourceInfo": {"SourceType": "Upload", "SourceContext": ""},
                    "Vid": file_id,
                },
                "ProcedureTaskId": self.rng.choice(("", self.task_id("procedurev2"))),
                "ReviewAudioVideoTaskId": "",
            },
        }

    def file_deleted(self) -> dict[str, Any]:
        file_ids = [self.file_id() for _ in range(self.rng.randint(1, 3))]
        event: dict[str, Any] = {"FileIdSet": file_ids}
        if self.rng.random() < 0.5:
            event["FileDeleteResultInfo"] = [
                {"FileId": file_id, "DeleteParts": [{"Type": "Video", "Definition": 0}]}
                for file_id in file_ids
            ]
        return {"EventType": "FileDeleted", "FileDeleteEvent": event}

    def hologram(self, position: int) -> dict[str, Any]:
        file_id = self.file_id()
        return {
            "EventType": "HologramRenderComplete",
            "HologramRenderCompleteEvent": {
                "TaskId": self.task_id("hologram"),
                "Status": "FINISH",
                "ErrCode": 0,
                "Message": "",
                "FileId": file_id,
                "Output": {
                    "HologramUrl": self.url(f"{file_id[-6:]}.holo"),
                    "VoxelCount": self.rng.randrange(10**6, 10**8),
                    "Frames": self.rng.randrange(24, 7200),
                    "FinishTime": self.time(position),
                },
                "SessionContext": "",
                "SessionId": "",
            },
        }


def _procedure_body(event: dict[str, Any], explicit_nulls: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"EventType": "ProcedureStateChanged"}
    if explicit_nulls:  # like the 2019 docs and tccli samples: sibling payload keys as null
        body.update({"FileUploadEvent": None, "FileDeleteEvent": None, "PullCompleteEvent": None})
    body["ProcedureStateChangeEvent"] = event
    return body


def _still_processing(result: dict[str, Any]) -> dict[str, Any]:
    kind = result["Type"]
    task = result[TASK_KEY[kind]]
    return {
        "Type": kind,
        TASK_KEY[kind]: {
            "Status": "PROCESSING",
            "ErrCode": 0,
            "Message": "",
            "Input": task["Input"],
            "Output": None,
        },
    }


def _ai_task(kind: str, output: dict[str, Any]) -> dict[str, Any]:
    return {
        "Type": kind,
        f"{kind}Task": {
            "Status": "SUCCESS",
            "ErrCode": 0,
            "Message": "",
            "Input": {"Definition": 10},
            "Output": output,
        },
    }
