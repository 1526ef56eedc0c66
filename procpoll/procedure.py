"""The ProcedureTask family: typed, lossless views of a ProcedureStateChanged payload."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import (
    TYPE_CHECKING,
    Any,
    Literal,
    NamedTuple,
    TypeVar,
    dataclass_transform,
    overload,
)

from procpoll.errors import EventParseError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

JsonObject = Mapping[str, Any]
T = TypeVar("T")
M = TypeVar("M", bound="DataclassInstance")
Reader = Callable[[JsonObject, str, str], T]  # (object, key, path of the object) -> value


# --- scalars: a mismatch is never an error, it reads as None ---------------------------------


def as_text(value: object) -> str | None:
    """A JSON scalar as text: strings as they are, numbers as `str(value)`, anything else None."""
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        try:
            return str(value)
        except ValueError:  # an int longer than sys.get_int_max_str_digits()
            return None
    return None


def as_float(value: object) -> float | None:
    """A finite number, or a string that parses as one; booleans are not numbers."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        number = float(value)
    except (ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def as_int(value: object) -> int | None:
    """An integer, an integral float, or a string that parses as either; else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            pass
    number = as_float(value)
    return int(number) if number is not None and number.is_integer() else None


def _str(d: JsonObject, key: str, path: str) -> str | None:
    return as_text(d.get(key))


def _int(d: JsonObject, key: str, path: str) -> int | None:
    return as_int(d.get(key))


def _float(d: JsonObject, key: str, path: str) -> float | None:
    return as_float(d.get(key))


# --- structure: a wrong container type makes the object unusable, so it raises ---------------


def _absent(value: object) -> bool:
    """VOD writes an empty member as missing, null, [] or {} depending on the year."""
    return value is None or (isinstance(value, list | dict) and not value)


def _dict(d: JsonObject, key: str, path: str) -> JsonObject | None:
    value = d.get(key)
    if _absent(value):
        return None
    if not isinstance(value, dict):
        raise EventParseError(f"{path}.{key}", f"expected an object, got {type(value).__name__}")
    return value


def _list(d: JsonObject, key: str, path: str) -> list[object]:
    value = d.get(key)
    if _absent(value):
        return []
    if not isinstance(value, list):
        raise EventParseError(f"{path}.{key}", f"expected a list, got {type(value).__name__}")
    return value


def _objects(d: JsonObject, key: str, path: str) -> Iterator[tuple[JsonObject, str]]:
    """Each item of the object list `d[key]`, with its path."""
    for i, item in enumerate(_list(d, key, path)):
        item_path = f"{path}.{key}[{i}]"
        if not isinstance(item, dict):
            raise EventParseError(item_path, f"expected an object, got {type(item).__name__}")
        yield item, item_path


def _texts(d: JsonObject, key: str, path: str) -> tuple[str, ...]:
    """A list of strings; items that are no scalar are left out (they stay in raw)."""
    return tuple(t for t in map(as_text, _list(d, key, path)) if t is not None)


def _ints(d: JsonObject, key: str, path: str) -> tuple[int, ...]:
    return tuple(n for n in map(as_int, _list(d, key, path)) if n is not None)


def _one(cls: type[M]) -> Reader[M | None]:
    def read(d: JsonObject, key: str, path: str) -> M | None:
        obj = _dict(d, key, path)
        return None if obj is None else _build(cls, obj, f"{path}.{key}")

    return read


def _many(cls: type[M]) -> Reader[tuple[M, ...]]:
    def read(d: JsonObject, key: str, path: str) -> tuple[M, ...]:
        return tuple(_build(cls, item, item_path) for item, item_path in _objects(d, key, path))

    return read


# --- declarative models: each field names its JSON key and its reader -------------------------


@overload
def _json(key: str) -> str | None: ...
@overload
def _json(key: str, read: Reader[T]) -> T: ...
def _json(key: str, read: Reader[Any] = _str) -> Any:
    """A model field read from JSON member `key` by `read` (default: as text).

    The overloads make mypy check each field's annotation against its reader's result.
    """
    return field(metadata={"json": (key, read)})


@dataclass_transform(frozen_default=True, field_specifiers=(_json, field))
def _model(cls: type[T]) -> type[T]:
    """`@dataclass(frozen=True, slots=True)`, with `_json` fields known to type checkers."""
    return dataclass(frozen=True, slots=True)(cls)


def _build(cls: type[M], d: JsonObject, path: str, **extra: object) -> M:
    """Read every `_json` field of `cls` from `d`; `extra` supplies the others; raw is `d`."""
    values: dict[str, Any] = {"raw": d}
    for f in fields(cls):
        if "json" in f.metadata:
            key, read = f.metadata["json"]
            values[f.name] = read(d, key, path)
    values.update(extra)
    return cls(**values)


@_model
class DynamicRangeInfo:
    """SDR/HDR information of a video stream."""

    type: str | None = _json("Type")
    hdr_type: str | None = _json("HDRType")
    raw: JsonObject = field(repr=False)


@_model
class MediaVideoStreamItem:
    """One video stream of a media file or of an output."""

    bitrate: int | None = _json("Bitrate", _int)
    height: int | None = _json("Height", _int)
    width: int | None = _json("Width", _int)
    codec: str | None = _json("Codec")
    fps: int | None = _json("Fps", _int)
    codec_tag: str | None = _json("CodecTag")
    dynamic_range_info: DynamicRangeInfo | None = _json("DynamicRangeInfo", _one(DynamicRangeInfo))
    raw: JsonObject = field(repr=False)


@_model
class MediaAudioStreamItem:
    """One audio stream of a media file or of an output."""

    bitrate: int | None = _json("Bitrate", _int)
    sampling_rate: int | None = _json("SamplingRate", _int)
    codec: str | None = _json("Codec")
    raw: JsonObject = field(repr=False)


@_model
class MediaMetaData:
    """Metadata of the source file (sizes in bytes, bitrates in bps, durations in s)."""

    size: int | None = _json("Size", _int)
    container: str | None = _json("Container")
    bitrate: int | None = _json("Bitrate", _int)
    height: int | None = _json("Height", _int)
    width: int | None = _json("Width", _int)
    duration: float | None = _json("Duration", _float)
    rotate: int | None = _json("Rotate", _int)
    video_streams: tuple[MediaVideoStreamItem, ...] = _json(
        "VideoStreamSet", _many(MediaVideoStreamItem)
    )
    audio_streams: tuple[MediaAudioStreamItem, ...] = _json(
        "AudioStreamSet", _many(MediaAudioStreamItem)
    )
    video_duration: float | None = _json("VideoDuration", _float)
    audio_duration: float | None = _json("AudioDuration", _float)
    md5: str | None = _json("Md5")
    raw: JsonObject = field(repr=False)


@_model
class TaskInput:
    """The input of a media-processing sub-task: its template, the rest kept in raw."""

    definition: int | None = _json("Definition", _int)
    raw: JsonObject = field(repr=False)


@_model
class MediaTranscodeItem:
    """Output of a Transcode sub-task."""

    url: str | None = _json("Url")
    definition: int | None = _json("Definition", _int)
    bitrate: int | None = _json("Bitrate", _int)
    height: int | None = _json("Height", _int)
    width: int | None = _json("Width", _int)
    size: int | None = _json("Size", _int)
    duration: float | None = _json("Duration", _float)
    md5: str | None = _json("Md5")
    container: str | None = _json("Container")
    video_streams: tuple[MediaVideoStreamItem, ...] = _json(
        "VideoStreamSet", _many(MediaVideoStreamItem)
    )
    audio_streams: tuple[MediaAudioStreamItem, ...] = _json(
        "AudioStreamSet", _many(MediaAudioStreamItem)
    )
    digital_watermark_type: str | None = _json("DigitalWatermarkType")
    copy_right_watermark_text: str | None = _json("CopyRightWatermarkText")
    blind_watermark_definition: int | None = _json("BlindWatermarkDefinition", _int)
    file_id: str | None = _json("FileId")
    raw: JsonObject = field(repr=False)


@_model
class MediaAnimatedGraphicsItem:
    """Output of an AnimatedGraphics sub-task."""

    url: str | None = _json("Url")
    definition: int | None = _json("Definition", _int)
    container: str | None = _json("Container")
    height: int | None = _json("Height", _int)
    width: int | None = _json("Width", _int)
    bitrate: int | None = _json("Bitrate", _int)
    size: int | None = _json("Size", _int)
    md5: str | None = _json("Md5")
    start_time_offset: float | None = _json("StartTimeOffset", _float)
    end_time_offset: float | None = _json("EndTimeOffset", _float)
    raw: JsonObject = field(repr=False)


@_model
class MediaSnapshotByTimePicInfoItem:
    """One picture of a snapshot output."""

    time_offset: float | None = _json("TimeOffset", _float)
    url: str | None = _json("Url")
    watermark_definitions: tuple[int, ...] = _json("WaterMarkDefinition", _ints)
    raw: JsonObject = field(repr=False)


@_model
class MediaSnapshotByTimeOffsetItem:
    """Output of a SnapshotByTimeOffset sub-task."""

    definition: int | None = _json("Definition", _int)
    pic_infos: tuple[MediaSnapshotByTimePicInfoItem, ...] = _json(
        "PicInfoSet", _many(MediaSnapshotByTimePicInfoItem)
    )
    raw: JsonObject = field(repr=False)


@_model
class MediaSampleSnapshotItem:
    """Output of a SampleSnapshot sub-task (older docs list `PicInfoSet` instead of URLs)."""

    definition: int | None = _json("Definition", _int)
    sample_type: str | None = _json("SampleType")
    interval: int | None = _json("Interval", _int)
    image_urls: tuple[str, ...] = _json("ImageUrlSet", _texts)
    watermark_definitions: tuple[int, ...] = _json("WaterMarkDefinition", _ints)
    pic_infos: tuple[MediaSnapshotByTimePicInfoItem, ...] = _json(
        "PicInfoSet", _many(MediaSnapshotByTimePicInfoItem)
    )
    raw: JsonObject = field(repr=False)


@_model
class MediaImageSpriteItem:
    """Output of an ImageSprites sub-task."""

    definition: int | None = _json("Definition", _int)
    height: int | None = _json("Height", _int)
    width: int | None = _json("Width", _int)
    total_count: int | None = _json("TotalCount", _int)
    image_urls: tuple[str, ...] = _json("ImageUrlSet", _texts)
    web_vtt_url: str | None = _json("WebVttUrl")
    raw: JsonObject = field(repr=False)


@_model
class CoverBySnapshotTaskOutput:
    """Output of a CoverBySnapshot sub-task."""

    cover_url: str | None = _json("CoverUrl")
    raw: JsonObject = field(repr=False)


@_model
class MediaSubStreamInfoItem:
    """One rendition inside an adaptive stream."""

    type: str | None = _json("Type")
    width: int | None = _json("Width", _int)
    height: int | None = _json("Height", _int)
    size: int | None = _json("Size", _int)
    raw: JsonObject = field(repr=False)


@_model
class MediaSubtitleItem:
    """One subtitle track of an adaptive stream."""

    id: str | None = _json("Id")
    name: str | None = _json("Name")
    language: str | None = _json("Language")
    format: str | None = _json("Format")
    url: str | None = _json("Url")
    raw: JsonObject = field(repr=False)


@_model
class AdaptiveDynamicStreamingInfoItem:
    """Output of an AdaptiveDynamicStreaming sub-task (HLS or DASH)."""

    definition: int | None = _json("Definition", _int)
    package: str | None = _json("Package")
    drm_type: str | None = _json("DrmType")
    url: str | None = _json("Url")
    size: int | None = _json("Size", _int)
    digital_watermark_type: str | None = _json("DigitalWatermarkType")
    sub_streams: tuple[MediaSubStreamInfoItem, ...] = _json(
        "SubStreamSet", _many(MediaSubStreamInfoItem)
    )
    copy_right_watermark_text: str | None = _json("CopyRightWatermarkText")
    blind_watermark_definition: int | None = _json("BlindWatermarkDefinition", _int)
    subtitles: tuple[MediaSubtitleItem, ...] = _json("SubtitleSet", _many(MediaSubtitleItem))
    default_subtitle_id: str | None = _json("DefaultSubtitleId")
    drm_encrypt_type: str | None = _json("DrmEncryptType")
    raw: JsonObject = field(repr=False)


TaskOutput = (
    MediaTranscodeItem
    | MediaAnimatedGraphicsItem
    | MediaSnapshotByTimeOffsetItem
    | MediaSampleSnapshotItem
    | MediaImageSpriteItem
    | CoverBySnapshotTaskOutput
    | AdaptiveDynamicStreamingInfoItem
)

# kind -> (member holding the sub-task, its Output type). The Type enumeration says
# "ImageSprites", the ImageSpriteTask description says "ImageSprite": both are one kind.
_MEDIA_KINDS: dict[str, tuple[str, type[TaskOutput]]] = {
    "Transcode": ("TranscodeTask", MediaTranscodeItem),
    "AnimatedGraphics": ("AnimatedGraphicTask", MediaAnimatedGraphicsItem),
    "SnapshotByTimeOffset": ("SnapshotByTimeOffsetTask", MediaSnapshotByTimeOffsetItem),
    "SampleSnapshot": ("SampleSnapshotTask", MediaSampleSnapshotItem),
    "ImageSprites": ("ImageSpriteTask", MediaImageSpriteItem),
    "CoverBySnapshot": ("CoverBySnapshotTask", CoverBySnapshotTaskOutput),
    "AdaptiveDynamicStreaming": ("AdaptiveDynamicStreamingTask", AdaptiveDynamicStreamingInfoItem),
}
_KIND_ALIASES = {"ImageSprite": "ImageSprites"}
_KIND_OF_MEMBER = {member: kind for kind, (member, _) in _MEDIA_KINDS.items()}


def _is_failure(status: str | None, err_code: int | None, err_code_ext: str | None) -> bool:
    return status == "FAIL" or bool(err_code) or bool(err_code_ext)


@_model
class SubTask:
    """The envelope every media-processing sub-task result shares; `output` is typed by kind."""

    status: str | None = _json("Status")
    err_code: int | None = _json("ErrCode", _int)
    err_code_ext: str | None = _json("ErrCodeExt")
    message: str | None = _json("Message")
    progress: int | None = _json("Progress", _int)
    begin_process_time: str | None = _json("BeginProcessTime")
    finish_time: str | None = _json("FinishTime")
    input: TaskInput | None = _json("Input", _one(TaskInput))
    output: TaskOutput | None
    raw: JsonObject = field(repr=False)

    @property
    def failed(self) -> bool:
        """FAIL, or an error code although the status may say otherwise."""
        return _is_failure(self.status, self.err_code, self.err_code_ext)


@_model
class MediaProcessTaskResult:
    """One item of MediaProcessResultSet: `type` as received, `kind` normalised."""

    type: str | None
    kind: str | None
    task: SubTask | None
    raw: JsonObject = field(repr=False)


@_model
class AiResult:
    """One item of an AI result set; the sub-task's own Input/Output stay in raw[task_key]."""

    type: str | None
    task_key: str | None
    status: str | None = _json("Status")
    err_code: int | None = _json("ErrCode", _int)
    err_code_ext: str | None = _json("ErrCodeExt")
    message: str | None = _json("Message")
    progress: int | None = _json("Progress", _int)
    begin_process_time: str | None = _json("BeginProcessTime")
    finish_time: str | None = _json("FinishTime")
    raw: JsonObject = field(repr=False)

    @property
    def failed(self) -> bool:
        """FAIL, or an error code although the status may say otherwise."""
        return _is_failure(self.status, self.err_code, self.err_code_ext)


def _task_member(d: JsonObject) -> str | None:
    """The first member named "...Task" that holds something (AI sets name it by type)."""
    return next((k for k, v in d.items() if k.endswith("Task") and not _absent(v)), None)


def _media_result(item: JsonObject, path: str) -> MediaProcessTaskResult:
    type_ = as_text(item.get("Type"))
    kind = None if type_ is None else _KIND_ALIASES.get(type_, type_)
    member, output_type = _MEDIA_KINDS.get(kind or "", (_task_member(item), None))
    if kind is None and member is not None:
        kind = _KIND_OF_MEMBER.get(member)
        output_type = _MEDIA_KINDS[kind][1] if kind is not None else None
    sub = None if member is None else _dict(item, member, path)
    if sub is None:
        return MediaProcessTaskResult(type=type_, kind=kind, task=None, raw=item)
    sub_path = f"{path}.{member}"
    out = _dict(sub, "Output", sub_path)
    output = None
    if out is not None and output_type is not None:
        output = _build(output_type, out, f"{sub_path}.Output")
    task = _build(SubTask, sub, sub_path, output=output)
    return MediaProcessTaskResult(type=type_, kind=kind, task=task, raw=item)


def _media_results(d: JsonObject, key: str, path: str) -> tuple[MediaProcessTaskResult, ...]:
    return tuple(_media_result(item, item_path) for item, item_path in _objects(d, key, path))


def _ai_result(item: JsonObject, path: str) -> AiResult:
    member = _task_member(item)
    sub = None if member is None else _dict(item, member, path)
    type_ = as_text(item.get("Type"))
    return _build(AiResult, sub or {}, path, type=type_, task_key=member, raw=item)


def _ai_results(d: JsonObject, key: str, path: str) -> tuple[AiResult, ...]:
    return tuple(_ai_result(item, item_path) for item, item_path in _objects(d, key, path))


class FailedSubtask(NamedTuple):
    """A sub-task that failed: which set, its Type, ErrCodeExt (else ErrCode), Message."""

    set_name: str
    type: str
    code: str
    message: str


_AI_SETS = ("AiContentReviewResultSet", "AiAnalysisResultSet", "AiRecognitionResultSet")


@_model
class ProcedureTask:
    """A task flow's state (the ProcedureStateChangeEvent payload)."""

    task_id: str | None = _json("TaskId")
    status: str | None = _json("Status")
    err_code: int | None = _json("ErrCode", _int)
    message: str | None = _json("Message")
    file_id: str | None = _json("FileId")
    file_name: str | None = _json("FileName")
    file_url: str | None = _json("FileUrl")
    meta_data: MediaMetaData | None = _json("MetaData", _one(MediaMetaData))
    media_process_results: tuple[MediaProcessTaskResult, ...] = _json(
        "MediaProcessResultSet", _media_results
    )
    ai_content_review_results: tuple[AiResult, ...] = _json(_AI_SETS[0], _ai_results)
    ai_analysis_results: tuple[AiResult, ...] = _json(_AI_SETS[1], _ai_results)
    ai_recognition_results: tuple[AiResult, ...] = _json(_AI_SETS[2], _ai_results)
    tasks_priority: int | None = _json("TasksPriority", _int)
    tasks_notify_mode: str | None = _json("TasksNotifyMode")
    session_context: str | None = _json("SessionContext")
    session_id: str | None = _json("SessionId")
    operator: str | None = _json("Operator")
    operation_type: str | None = _json("OperationType")
    raw: JsonObject = field(repr=False)

    @overload
    def outputs(self, kind: Literal["Transcode"]) -> list[MediaTranscodeItem]: ...
    @overload
    def outputs(self, kind: Literal["AnimatedGraphics"]) -> list[MediaAnimatedGraphicsItem]: ...
    @overload
    def outputs(
        self, kind: Literal["SnapshotByTimeOffset"]
    ) -> list[MediaSnapshotByTimeOffsetItem]: ...
    @overload
    def outputs(self, kind: Literal["SampleSnapshot"]) -> list[MediaSampleSnapshotItem]: ...
    @overload
    def outputs(
        self, kind: Literal["ImageSprites", "ImageSprite"]
    ) -> list[MediaImageSpriteItem]: ...
    @overload
    def outputs(self, kind: Literal["CoverBySnapshot"]) -> list[CoverBySnapshotTaskOutput]: ...
    @overload
    def outputs(
        self, kind: Literal["AdaptiveDynamicStreaming"]
    ) -> list[AdaptiveDynamicStreamingInfoItem]: ...
    @overload
    def outputs(self, kind: str) -> list[TaskOutput]: ...

    def outputs(self, kind: str) -> list[Any]:
        """Outputs of the successful media-processing sub-tasks of `kind`, in order."""
        kind = _KIND_ALIASES.get(kind, kind)
        return [
            r.task.output
            for r in self.media_process_results
            if r.kind == kind
            and r.task is not None
            and r.task.status == "SUCCESS"
            and not r.task.failed
            and r.task.output is not None
        ]

    @property
    def cover_url(self) -> str | None:
        """The cover a CoverBySnapshot sub-task made, if any."""
        return next((o.cover_url for o in self.outputs("CoverBySnapshot") if o.cover_url), None)

    @property
    def failed_subtasks(self) -> list[FailedSubtask]:
        """Every sub-task, media or AI, that reports FAIL or an error code."""
        return [
            FailedSubtask(set_name, type_ or "", _error_code(t), t.message or "")
            for set_name, type_, t in self._subtasks()
            if t.failed
        ]

    @property
    def all_succeeded(self) -> bool:
        """The flow is FINISHed and neither it nor any sub-task reports a failure."""
        return self.status == "FINISH" and not self.err_code and not self.failed_subtasks

    def _subtasks(self) -> Iterator[tuple[str, str | None, SubTask | AiResult]]:
        for r in self.media_process_results:
            if r.task is not None:
                yield "MediaProcessResultSet", r.type, r.task
        ai_sets = (
            self.ai_content_review_results,
            self.ai_analysis_results,
            self.ai_recognition_results,
        )
        for set_name, results in zip(_AI_SETS, ai_sets, strict=True):
            for a in results:
                yield set_name, a.type, a


def _error_code(t: SubTask | AiResult) -> str:
    return t.err_code_ext or ("" if t.err_code is None else str(t.err_code))


def parse_procedure_task(value: object, path: str) -> ProcedureTask | None:
    """Type a ProcedureStateChangeEvent payload; None when it is absent or empty.

    Raises EventParseError naming the JSON path of the first member whose container type
    makes the structure unusable; scalar mismatches read as None and never raise.
    """
    if _absent(value):
        return None
    if not isinstance(value, dict):
        raise EventParseError(path, f"expected an object, got {type(value).__name__}")
    return _build(ProcedureTask, value, path)
