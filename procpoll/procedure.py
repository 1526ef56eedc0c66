"""The ProcedureTask family: typed, lossless views of a ProcedureStateChanged payload."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import field
from typing import Any, Literal, NamedTuple, overload

from procpoll.errors import EventParseError
from procpoll.jsonread import (
    JsonObject,
    as_text,
    build,
    is_absent,
    many,
    member,
    model,
    one,
    read_float,
    read_int,
    read_ints,
    read_object,
    read_objects,
    read_texts,
)


@model
class DynamicRangeInfo:
    """SDR/HDR information of a video stream."""

    type: str | None = member("Type")
    hdr_type: str | None = member("HDRType")
    raw: JsonObject = field(repr=False)


@model
class MediaVideoStreamItem:
    """One video stream of a media file or of an output."""

    bitrate: int | None = member("Bitrate", read_int)
    height: int | None = member("Height", read_int)
    width: int | None = member("Width", read_int)
    codec: str | None = member("Codec")
    fps: int | None = member("Fps", read_int)
    codec_tag: str | None = member("CodecTag")
    dynamic_range_info: DynamicRangeInfo | None = member("DynamicRangeInfo", one(DynamicRangeInfo))
    raw: JsonObject = field(repr=False)


@model
class MediaAudioStreamItem:
    """One audio stream of a media file or of an output."""

    bitrate: int | None = member("Bitrate", read_int)
    sampling_rate: int | None = member("SamplingRate", read_int)
    codec: str | None = member("Codec")
    raw: JsonObject = field(repr=False)


@model
class MediaMetaData:
    """Metadata of the source file (sizes in bytes, bitrates in bps, durations in s)."""

    size: int | None = member("Size", read_int)
    container: str | None = member("Container")
    bitrate: int | None = member("Bitrate", read_int)
    height: int | None = member("Height", read_int)
    width: int | None = member("Width", read_int)
    duration: float | None = member("Duration", read_float)
    rotate: int | None = member("Rotate", read_int)
    video_streams: tuple[MediaVideoStreamItem, ...] = member(
        "VideoStreamSet", many(MediaVideoStreamItem)
    )
    audio_streams: tuple[MediaAudioStreamItem, ...] = member(
        "AudioStreamSet", many(MediaAudioStreamItem)
    )
    video_duration: float | None = member("VideoDuration", read_float)
    audio_duration: float | None = member("AudioDuration", read_float)
    md5: str | None = member("Md5")
    raw: JsonObject = field(repr=False)


@model
class TaskInput:
    """The input of a media-processing sub-task: its template, the rest kept in raw."""

    definition: int | None = member("Definition", read_int)
    raw: JsonObject = field(repr=False)


@model
class MediaTranscodeItem:
    """Output of a Transcode sub-task."""

    url: str | None = member("Url")
    definition: int | None = member("Definition", read_int)
    bitrate: int | None = member("Bitrate", read_int)
    height: int | None = member("Height", read_int)
    width: int | None = member("Width", read_int)
    size: int | None = member("Size", read_int)
    duration: float | None = member("Duration", read_float)
    md5: str | None = member("Md5")
    container: str | None = member("Container")
    video_streams: tuple[MediaVideoStreamItem, ...] = member(
        "VideoStreamSet", many(MediaVideoStreamItem)
    )
    audio_streams: tuple[MediaAudioStreamItem, ...] = member(
        "AudioStreamSet", many(MediaAudioStreamItem)
    )
    digital_watermark_type: str | None = member("DigitalWatermarkType")
    copy_right_watermark_text: str | None = member("CopyRightWatermarkText")
    blind_watermark_definition: int | None = member("BlindWatermarkDefinition", read_int)
    file_id: str | None = member("FileId")
    raw: JsonObject = field(repr=False)


@model
class MediaAnimatedGraphicsItem:
    """Output of an AnimatedGraphics sub-task."""

    url: str | None = member("Url")
    definition: int | None = member("Definition", read_int)
    container: str | None = member("Container")
    height: int | None = member("Height", read_int)
    width: int | None = member("Width", read_int)
    bitrate: int | None = member("Bitrate", read_int)
    size: int | None = member("Size", read_int)
    md5: str | None = member("Md5")
    start_time_offset: float | None = member("StartTimeOffset", read_float)
    end_time_offset: float | None = member("EndTimeOffset", read_float)
    raw: JsonObject = field(repr=False)


@model
class MediaSnapshotByTimePicInfoItem:
    """One picture of a snapshot output."""

    time_offset: float | None = member("TimeOffset", read_float)
    url: str | None = member("Url")
    watermark_definitions: tuple[int, ...] = member("WaterMarkDefinition", read_ints)
    raw: JsonObject = field(repr=False)


@model
class MediaSnapshotByTimeOffsetItem:
    """Output of a SnapshotByTimeOffset sub-task."""

    definition: int | None = member("Definition", read_int)
    pic_infos: tuple[MediaSnapshotByTimePicInfoItem, ...] = member(
        "PicInfoSet", many(MediaSnapshotByTimePicInfoItem)
    )
    raw: JsonObject = field(repr=False)


@model
class MediaSampleSnapshotItem:
    """Output of a SampleSnapshot sub-task (older docs list `PicInfoSet` instead of URLs)."""

    definition: int | None = member("Definition", read_int)
    sample_type: str | None = member("SampleType")
    interval: int | None = member("Interval", read_int)
    image_urls: tuple[str, ...] = member("ImageUrlSet", read_texts)
    watermark_definitions: tuple[int, ...] = member("WaterMarkDefinition", read_ints)
    pic_infos: tuple[MediaSnapshotByTimePicInfoItem, ...] = member(
        "PicInfoSet", many(MediaSnapshotByTimePicInfoItem)
    )
    raw: JsonObject = field(repr=False)


@model
class MediaImageSpriteItem:
    """Output of an ImageSprites sub-task."""

    definition: int | None = member("Definition", read_int)
    height: int | None = member("Height", read_int)
    width: int | None = member("Width", read_int)
    total_count: int | None = member("TotalCount", read_int)
    image_urls: tuple[str, ...] = member("ImageUrlSet", read_texts)
    web_vtt_url: str | None = member("WebVttUrl")
    raw: JsonObject = field(repr=False)


@model
class CoverBySnapshotTaskOutput:
    """Output of a CoverBySnapshot sub-task."""

    cover_url: str | None = member("CoverUrl")
    raw: JsonObject = field(repr=False)


@model
class MediaSubStreamInfoItem:
    """One rendition inside an adaptive stream."""

    type: str | None = member("Type")
    width: int | None = member("Width", read_int)
    height: int | None = member("Height", read_int)
    size: int | None = member("Size", read_int)
    raw: JsonObject = field(repr=False)


@model
class MediaSubtitleItem:
    """One subtitle track of an adaptive stream."""

    id: str | None = member("Id")
    name: str | None = member("Name")
    language: str | None = member("Language")
    format: str | None = member("Format")
    url: str | None = member("Url")
    raw: JsonObject = field(repr=False)


@model
class AdaptiveDynamicStreamingInfoItem:
    """Output of an AdaptiveDynamicStreaming sub-task (HLS or DASH)."""

    definition: int | None = member("Definition", read_int)
    package: str | None = member("Package")
    drm_type: str | None = member("DrmType")
    url: str | None = member("Url")
    size: int | None = member("Size", read_int)
    digital_watermark_type: str | None = member("DigitalWatermarkType")
    sub_streams: tuple[MediaSubStreamInfoItem, ...] = member(
        "SubStreamSet", many(MediaSubStreamInfoItem)
    )
    copy_right_watermark_text: str | None = member("CopyRightWatermarkText")
    blind_watermark_definition: int | None = member("BlindWatermarkDefinition", read_int)
    subtitles: tuple[MediaSubtitleItem, ...] = member("SubtitleSet", many(MediaSubtitleItem))
    default_subtitle_id: str | None = member("DefaultSubtitleId")
    drm_encrypt_type: str | None = member("DrmEncryptType")
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


@model
class SubTask:
    """The envelope every media-processing sub-task result shares; `output` is typed by kind."""

    status: str | None = member("Status")
    err_code: int | None = member("ErrCode", read_int)
    err_code_ext: str | None = member("ErrCodeExt")
    message: str | None = member("Message")
    progress: int | None = member("Progress", read_int)
    begin_process_time: str | None = member("BeginProcessTime")
    finish_time: str | None = member("FinishTime")
    input: TaskInput | None = member("Input", one(TaskInput))
    output: TaskOutput | None
    raw: JsonObject = field(repr=False)

    @property
    def failed(self) -> bool:
        """FAIL, or an error code although the status may say otherwise."""
        return _is_failure(self.status, self.err_code, self.err_code_ext)


@model
class MediaProcessTaskResult:
    """One item of MediaProcessResultSet: `type` as received, `kind` normalised."""

    type: str | None
    kind: str | None
    task: SubTask | None
    raw: JsonObject = field(repr=False)


@model
class AiResult:
    """One item of an AI result set; the sub-task's own Input/Output stay in raw[task_key]."""

    type: str | None
    task_key: str | None
    status: str | None = member("Status")
    err_code: int | None = member("ErrCode", read_int)
    err_code_ext: str | None = member("ErrCodeExt")
    message: str | None = member("Message")
    progress: int | None = member("Progress", read_int)
    begin_process_time: str | None = member("BeginProcessTime")
    finish_time: str | None = member("FinishTime")
    raw: JsonObject = field(repr=False)

    @property
    def failed(self) -> bool:
        """FAIL, or an error code although the status may say otherwise."""
        return _is_failure(self.status, self.err_code, self.err_code_ext)


def _task_member(d: JsonObject) -> str | None:
    """The first member named "...Task" that holds something (AI sets name it by type)."""
    return next((k for k, v in d.items() if k.endswith("Task") and not is_absent(v)), None)


def _media_result(item: JsonObject, path: str) -> MediaProcessTaskResult:
    type_ = as_text(item.get("Type"))
    kind = None if type_ is None else _KIND_ALIASES.get(type_, type_)
    member, output_type = _MEDIA_KINDS.get(kind or "", (_task_member(item), None))
    if kind is None and member is not None:
        kind = _KIND_OF_MEMBER.get(member)
        output_type = _MEDIA_KINDS[kind][1] if kind is not None else None
    sub = None if member is None else read_object(item, member, path)
    if sub is None:
        return MediaProcessTaskResult(type=type_, kind=kind, task=None, raw=item)
    sub_path = f"{path}.{member}"
    out = read_object(sub, "Output", sub_path)
    output = None
    if out is not None and output_type is not None:
        output = build(output_type, out, f"{sub_path}.Output")
    task = build(SubTask, sub, sub_path, output=output)
    return MediaProcessTaskResult(type=type_, kind=kind, task=task, raw=item)


def _media_results(d: JsonObject, key: str, path: str) -> tuple[MediaProcessTaskResult, ...]:
    return tuple(_media_result(item, item_path) for item, item_path in read_objects(d, key, path))


def _ai_result(item: JsonObject, path: str) -> AiResult:
    member = _task_member(item)
    sub = None if member is None else read_object(item, member, path)
    type_ = as_text(item.get("Type"))
    return build(AiResult, sub or {}, path, type=type_, task_key=member, raw=item)


def _ai_results(d: JsonObject, key: str, path: str) -> tuple[AiResult, ...]:
    return tuple(_ai_result(item, item_path) for item, item_path in read_objects(d, key, path))


class FailedSubtask(NamedTuple):
    """A sub-task that failed: which set, its Type, ErrCodeExt (else ErrCode), Message."""

    set_name: str
    type: str
    code: str
    message: str


_AI_SETS = ("AiContentReviewResultSet", "AiAnalysisResultSet", "AiRecognitionResultSet")


@model
class ProcedureTask:
    """A task flow's state (the ProcedureStateChangeEvent payload)."""

    task_id: str | None = member("TaskId")
    status: str | None = member("Status")
    err_code: int | None = member("ErrCode", read_int)
    message: str | None = member("Message")
    file_id: str | None = member("FileId")
    file_name: str | None = member("FileName")
    file_url: str | None = member("FileUrl")
    meta_data: MediaMetaData | None = member("MetaData", one(MediaMetaData))
    media_process_results: tuple[MediaProcessTaskResult, ...] = member(
        "MediaProcessResultSet", _media_results
    )
    ai_content_review_results: tuple[AiResult, ...] = member(_AI_SETS[0], _ai_results)
    ai_analysis_results: tuple[AiResult, ...] = member(_AI_SETS[1], _ai_results)
    ai_recognition_results: tuple[AiResult, ...] = member(_AI_SETS[2], _ai_results)
    tasks_priority: int | None = member("TasksPriority", read_int)
    tasks_notify_mode: str | None = member("TasksNotifyMode")
    session_context: str | None = member("SessionContext")
    session_id: str | None = member("SessionId")
    operator: str | None = member("Operator")
    operation_type: str | None = member("OperationType")
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
    if is_absent(value):
        return None
    if not isinstance(value, dict):
        raise EventParseError(path, f"expected an object, got {type(value).__name__}")
    return build(ProcedureTask, value, path)
