"""Tests for procpoll.procedure: the typed ProcedureTask family read from real payloads."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from procpoll.errors import EventParseError
from procpoll.jsonread import as_float, as_int, as_text
from procpoll.procedure import (
    AdaptiveDynamicStreamingInfoItem,
    CoverBySnapshotTaskOutput,
    FailedSubtask,
    MediaAnimatedGraphicsItem,
    MediaImageSpriteItem,
    MediaSampleSnapshotItem,
    MediaSnapshotByTimeOffsetItem,
    MediaTranscodeItem,
    ProcedureTask,
    parse_procedure_task,
)

PAYLOADS = Path(__file__).parent / "data" / "payloads"
ROOT = "ProcedureStateChangeEvent"
TCCLI_2025 = "PullEvents-response-tccli-2025-03.json"
COVER = "ProcedureStateChanged-transcode-coverbysnapshot.json"
SNAPSHOTS = "ProcedureStateChanged-snapshot-sample-sprite-cover.json"
SNAPSHOTS_2023 = "ProcedureStateChanged-snapshot-sample-sprite-cover-2023.json"
REVIEW = "ProcedureStateChanged-aicontentreview.json"


def payload(name: str) -> dict[str, Any]:
    """The ProcedureStateChangeEvent object of a sample (first EventSet item if pulled)."""
    doc = json.loads((PAYLOADS / name).read_text(encoding="utf-8"))
    item = doc["Response"]["EventSet"][0] if "Response" in doc else doc
    result: dict[str, Any] = item[ROOT]
    return result


def parse(value: object) -> ProcedureTask:
    task = parse_procedure_task(value, ROOT)
    assert task is not None
    return task


def task_of(name: str) -> ProcedureTask:
    return parse(payload(name))


def test_task_members_are_typed() -> None:
    """The flow's own members read into snake_case fields."""
    task = task_of(TCCLI_2025)
    assert task.task_id == "1256712345-Procedure-475b7237438a39560b9879a4556cb177t2"
    assert (task.status, task.err_code, task.message) == ("FINISH", 0, "")
    assert (task.file_id, task.file_name) == ("5285890784246869930", "small")
    assert task.file_url is not None
    assert task.file_url.endswith("/1546950643_4191274987.100_0.jpg")
    assert (task.tasks_priority, task.tasks_notify_mode) == (0, "Finish")
    assert (task.session_context, task.session_id) == ("", "")
    assert (task.operator, task.operation_type) == ("", "")
    assert task.ai_content_review_results == task.ai_analysis_results == ()


def test_meta_data_is_typed() -> None:
    """MetaData and its stream sets read into MediaMetaData, down to DynamicRangeInfo."""
    meta = task_of(TCCLI_2025).meta_data
    assert meta is not None
    assert (meta.size, meta.container, meta.bitrate) == (
        7700180,
        "mov,mp4,m4a,3gp,3g2,mj2",
        1021028,
    )
    assert (meta.height, meta.width, meta.rotate) == (480, 640, 0)
    assert (meta.duration, meta.video_duration, meta.audio_duration) == (
        60.0,
        60.0,
        59.990001678467,
    )
    assert meta.md5 == "07d635581e7f295b623f40bad0fbfd4c1"
    (video,) = meta.video_streams
    assert (video.codec, video.fps, video.bitrate, video.codec_tag) == ("h264", 23, 637174, "")
    assert video.dynamic_range_info is not None
    assert (video.dynamic_range_info.type, video.dynamic_range_info.hdr_type) == ("SDR", "")
    (audio,) = meta.audio_streams
    assert (audio.codec, audio.sampling_rate, audio.bitrate) == ("aac", 48000, 383854)


def test_transcode_result_is_typed() -> None:
    """A Transcode result has its envelope, Input definition and a MediaTranscodeItem output."""
    (result,) = task_of(TCCLI_2025).media_process_results
    assert (result.type, result.kind) == ("Transcode", "Transcode")
    sub = result.task
    assert sub is not None
    assert (sub.status, sub.err_code, sub.err_code_ext, sub.progress) == ("SUCCESS", 0, "", 100)
    assert (sub.begin_process_time, sub.finish_time) == (
        "2023-09-08T02:23:29Z",
        "2023-09-08T03:23:29Z",
    )
    assert sub.input is not None
    assert sub.input.definition == 20
    assert sub.input.raw["TraceWatermark"] == {"Switch": "ON", "Definition": 1}
    out = sub.output
    assert isinstance(out, MediaTranscodeItem)
    assert out.url == (
        "http://123.vod2.myqcloud.com/d042887avodtransgzp1256768367/c643347c5285890784246869930/v.f20.mp4"
    )
    assert (out.definition, out.size, out.duration) == (0, 4189073, 60.04700088501)
    assert (out.md5, out.digital_watermark_type) == ("eff7031ad7877865f9a3240e9ab165ad", "None")
    assert out.video_streams[0].fps == 24
    assert out.audio_streams[0].sampling_rate == 44100


def test_animated_graphics_output_is_typed() -> None:
    """AnimatedGraphics (member AnimatedGraphicTask) yields a MediaAnimatedGraphicsItem."""
    (out,) = task_of("ProcedureStateChanged-animatedgraphics.json").outputs("AnimatedGraphics")
    assert isinstance(out, MediaAnimatedGraphicsItem)
    assert out.url == "http://1256768367.vod2.myqcloud.com/xxx/xxx/v.f20001.webp"
    assert (out.container, out.definition, out.size) == ("webp", 20001, 121601)
    assert (out.start_time_offset, out.end_time_offset) == (3.0, 5.0)


def test_snapshot_by_time_offset_output_is_typed() -> None:
    """SnapshotByTimeOffset yields its pictures; the sample's duplicate Definition reads as None."""
    task = task_of(SNAPSHOTS)
    (out,) = task.outputs("SnapshotByTimeOffset")
    assert isinstance(out, MediaSnapshotByTimeOffsetItem)
    assert [p.time_offset for p in out.pic_infos] == [3.0, 6.0, 9.0]
    assert out.pic_infos[0].url == "http://1256768367.vod2.myqcloud.com/xxx/xxx/xxx1.jpg"
    sub = task.media_process_results[0].task
    assert sub is not None
    assert sub.input is not None
    assert (sub.input.definition, sub.input.raw["Definition"]) == (None, [3, 6, 9])


def test_sample_snapshot_output_both_revisions() -> None:
    """SampleSnapshot reads the 2023 ImageUrlSet form and the older PicInfoSet form."""
    (new,) = task_of(SNAPSHOTS_2023).outputs("SampleSnapshot")
    assert isinstance(new, MediaSampleSnapshotItem)
    assert (new.sample_type, new.interval, new.watermark_definitions) == ("Percent", 10, ())
    assert len(new.image_urls) == 9
    assert new.image_urls[-1] == "http://1256768367.vod2.myqcloud.com/xxx/xxx/xxx9.jpg"
    (old,) = task_of(SNAPSHOTS).outputs("SampleSnapshot")
    assert old.image_urls == ()
    assert [p.time_offset for p in old.pic_infos][:2] == [6.0, 12.0]


def test_image_sprite_output_is_typed() -> None:
    """ImageSprites yields a MediaImageSpriteItem."""
    (out,) = task_of(SNAPSHOTS).outputs("ImageSprites")
    assert isinstance(out, MediaImageSpriteItem)
    assert (out.height, out.width, out.total_count) == (80, 142, 1)
    assert out.web_vtt_url == "http://1256768367.vod2.myqcloud.com/xxx/xxx/xxx.vtt"
    assert out.image_urls == ("http://1256768367.vod2.myqcloud.com/xxx/xxx/xxx1.jpg",)


def test_image_sprite_spellings_are_one_kind() -> None:
    """Type "ImageSprite" keeps its spelling but is the same kind as "ImageSprites"."""
    raw = payload(SNAPSHOTS)
    raw["MediaProcessResultSet"][2]["Type"] = "ImageSprite"
    task = parse(raw)
    result = task.media_process_results[2]
    assert (result.type, result.kind) == ("ImageSprite", "ImageSprites")
    assert (
        task.outputs("ImageSprite")
        == task.outputs("ImageSprites")
        == task_of(SNAPSHOTS).outputs("ImageSprites")
    )


def test_cover_by_snapshot_output_is_typed() -> None:
    """CoverBySnapshot yields its CoverUrl, also as ProcedureTask.cover_url."""
    task = task_of(COVER)
    (out,) = task.outputs("CoverBySnapshot")
    assert isinstance(out, CoverBySnapshotTaskOutput)
    assert (
        task.cover_url
        == out.cover_url
        == "http://1256768367.vod2.myqcloud.com/xxx/xxx/xxx.100_0.jpg"
    )
    assert task_of("ProcedureStateChanged-transcode-hls.json").cover_url is None


def test_adaptive_dynamic_streaming_output_is_typed() -> None:
    """AdaptiveDynamicStreaming yields package, DRM type and URL per output."""
    outs = task_of("ProcedureStateChanged-adaptivedynamicstreaming-drm.json").outputs(
        "AdaptiveDynamicStreaming"
    )
    assert all(isinstance(o, AdaptiveDynamicStreamingInfoItem) for o in outs)
    assert [(o.definition, o.package, o.drm_type) for o in outs] == [
        (11, "hls", "FairPlay"),
        (12, "hls", "SimpleAES"),
        (21, "dash", "Widevine"),
    ]
    assert outs[2].url == "http://1256768367.vod2.myqcloud.com/xxx/xxx/adp.21.mpd"


def test_adaptive_streaming_sub_streams_and_subtitles_are_typed() -> None:
    """SubStreamSet and SubtitleSet items read into their own types."""
    raw = payload("ProcedureStateChanged-adaptivedynamicstreaming.json")
    output = raw["MediaProcessResultSet"][0]["AdaptiveDynamicStreamingTask"]["Output"]
    output["SubStreamSet"] = [{"Type": "video", "Width": 1280, "Height": 720, "Size": 9}]
    output["SubtitleSet"] = [{"Id": "s1", "Language": "en", "Url": "u"}]
    (out, _) = parse(raw).outputs("AdaptiveDynamicStreaming")
    assert [(s.type, s.width, s.height, s.size) for s in out.sub_streams] == [
        ("video", 1280, 720, 9)
    ]
    assert [(s.id, s.language, s.url, s.name) for s in out.subtitles] == [("s1", "en", "u", None)]


def test_ai_content_review_results_are_typed() -> None:
    """Each review result has its Type, the member holding it, and the sub-task envelope."""
    results = task_of(REVIEW).ai_content_review_results
    assert [(r.type, r.task_key) for r in results] == [
        ("Porn", "PornTask"),
        ("Terrorism", "TerrorismTask"),
        ("Political", "PoliticalTask"),
    ]
    porn = results[0]
    assert (porn.status, porn.err_code, porn.message, porn.progress) == ("SUCCESS", 0, "", None)
    assert porn.task_key is not None
    assert porn.raw[porn.task_key]["Output"]["Suggestion"] == "block"


def test_ai_analysis_results_are_typed() -> None:
    """Analysis results (Classification, Cover, Tag) read with their envelopes."""
    results = task_of("ProcedureStateChanged-aianalysis.json").ai_analysis_results
    assert [(r.type, r.task_key, r.status) for r in results] == [
        ("Classification", "ClassificationTask", "SUCCESS"),
        ("Cover", "CoverTask", "SUCCESS"),
        ("Tag", "TagTask", "SUCCESS"),
    ]


def test_ai_recognition_results_are_typed() -> None:
    """Recognition results are found whatever the sub-task member is called."""
    (face,) = task_of("ProcedureStateChanged-airecognition.json").ai_recognition_results
    assert (face.type, face.task_key, face.status) == (
        "FaceRecognition",
        "FaceRecognitionTask",
        "SUCCESS",
    )
    assert face.raw["FaceRecognitionTask"]["Output"]["ResultSet"][0]["Name"] == "John Smith"


def test_finished_flow_without_failures_succeeded() -> None:
    """A FINISHed flow whose sub-tasks all succeeded reports all_succeeded."""
    task = task_of(SNAPSHOTS)
    assert task.all_succeeded
    assert task.failed_subtasks == []


def test_processing_flow_has_not_succeeded_yet() -> None:
    """A PROCESSING flow is not all_succeeded; PROCESSING sub-tasks neither fail nor output."""
    raw = payload(COVER)
    raw["Status"] = "PROCESSING"
    raw["MediaProcessResultSet"][0]["TranscodeTask"].update(Status="PROCESSING", Progress=40)
    task = parse(raw)
    assert not task.all_succeeded
    assert task.failed_subtasks == []
    assert task.outputs("Transcode") == []
    assert task.cover_url is not None


def test_failed_subtasks_are_listed_from_every_set() -> None:
    """FAIL, a non-zero ErrCode or a non-empty ErrCodeExt, media or AI, counts as a failure."""
    raw = payload(COVER)
    raw["MediaProcessResultSet"][0]["TranscodeTask"].update(
        Status="FAIL", ErrCodeExt="InternalError", Message="boom"
    )
    raw["MediaProcessResultSet"][1]["CoverBySnapshotTask"]["ErrCode"] = 70000
    raw["AiContentReviewResultSet"] = payload(REVIEW)["AiContentReviewResultSet"]
    raw["AiContentReviewResultSet"][1]["TerrorismTask"]["ErrCodeExt"] = "FailedOperation.X"
    task = parse(raw)
    assert task.failed_subtasks == [
        FailedSubtask("MediaProcessResultSet", "Transcode", "InternalError", "boom"),
        FailedSubtask("MediaProcessResultSet", "CoverBySnapshot", "70000", "SUCCESS"),
        FailedSubtask("AiContentReviewResultSet", "Terrorism", "FailedOperation.X", ""),
    ]
    assert not task.all_succeeded
    assert task.outputs("Transcode") == []
    assert task.cover_url is None


def test_flow_level_error_code_fails_the_flow() -> None:
    """The deprecated flow-level ErrCode still marks a FINISHed flow as not succeeded."""
    raw = payload(COVER)
    raw["ErrCode"] = 70000
    assert not parse(raw).all_succeeded


def set_in(doc: Any, path: list[str | int], value: object) -> None:
    for step in path[:-1]:
        doc = doc[step]
    doc[path[-1]] = value


def wrong_type_base() -> dict[str, Any]:
    """A flow with [Transcode, CoverBySnapshot, Transcode, ImageSprites] and review results."""
    raw = payload(COVER)
    results = raw["MediaProcessResultSet"]
    results.append(copy.deepcopy(results[0]))
    results.append(payload(SNAPSHOTS)["MediaProcessResultSet"][2])
    raw["AiContentReviewResultSet"] = payload(REVIEW)["AiContentReviewResultSet"]
    return raw


T2 = ["MediaProcessResultSet", 2, "TranscodeTask"]


@pytest.mark.parametrize(
    ("where", "value", "path"),
    [
        (["MetaData"], "x", "MetaData"),
        (["MetaData", "VideoStreamSet"], {"Codec": "h264"}, "MetaData.VideoStreamSet"),
        (["MetaData", "VideoStreamSet", 0], 5, "MetaData.VideoStreamSet[0]"),
        (["MetaData", "AudioStreamSet"], "aac", "MetaData.AudioStreamSet"),
        (["MediaProcessResultSet"], "x", "MediaProcessResultSet"),
        (["MediaProcessResultSet", 1], "nope", "MediaProcessResultSet[1]"),
        (T2, "x", "MediaProcessResultSet[2].TranscodeTask"),
        ([*T2, "Output"], [1], "MediaProcessResultSet[2].TranscodeTask.Output"),
        ([*T2, "Output"], "x", "MediaProcessResultSet[2].TranscodeTask.Output"),
        ([*T2, "Input"], 3, "MediaProcessResultSet[2].TranscodeTask.Input"),
        (
            [*T2, "Output", "VideoStreamSet", 0, "DynamicRangeInfo"],
            "SDR",
            "MediaProcessResultSet[2].TranscodeTask.Output.VideoStreamSet[0].DynamicRangeInfo",
        ),
        (
            ["MediaProcessResultSet", 3, "ImageSpriteTask", "Output", "ImageUrlSet"],
            "u",
            "MediaProcessResultSet[3].ImageSpriteTask.Output.ImageUrlSet",
        ),
        (["AiContentReviewResultSet"], {"Type": "Porn"}, "AiContentReviewResultSet"),
        (["AiContentReviewResultSet", 2], 7, "AiContentReviewResultSet[2]"),
        (["AiContentReviewResultSet", 0, "PornTask"], "x", "AiContentReviewResultSet[0].PornTask"),
        (["AiAnalysisResultSet"], 1.5, "AiAnalysisResultSet"),
        (["AiRecognitionResultSet"], True, "AiRecognitionResultSet"),
    ],
)
def test_wrong_container_type_names_its_path(
    where: list[str | int], value: object, path: str
) -> None:
    """A scalar or list where an object belongs, or a non-list where a set belongs, is refused."""
    raw = wrong_type_base()
    set_in(raw, where, value)
    with pytest.raises(EventParseError) as err:
        parse(raw)
    assert err.value.path == f"{ROOT}.{path}"


def test_snapshot_pictures_wrong_type_names_its_path() -> None:
    """A non-list PicInfoSet in a snapshot output is refused with its path."""
    raw = payload(SNAPSHOTS)
    raw["MediaProcessResultSet"][0]["SnapshotByTimeOffsetTask"]["Output"]["PicInfoSet"] = "x"
    with pytest.raises(EventParseError) as err:
        parse(raw)
    path = "MediaProcessResultSet[0].SnapshotByTimeOffsetTask.Output.PicInfoSet"
    assert err.value.path == f"{ROOT}.{path}"


@pytest.mark.parametrize("value", ["x", 3, [1], True])
def test_non_object_task_is_refused(value: object) -> None:
    """The payload itself must be an object."""
    with pytest.raises(EventParseError) as err:
        parse_procedure_task(value, ROOT)
    assert err.value.path == ROOT


@pytest.mark.parametrize("empty", [None, {}, []])
def test_empty_task_is_no_task(empty: object) -> None:
    """A null, {} or [] payload is no task at all."""
    assert parse_procedure_task(empty, ROOT) is None


@pytest.mark.parametrize("empty", ["<missing>", None, {}, []])
def test_missing_null_and_empty_are_alike(empty: object) -> None:
    """Absent, null, [] and {} members read the same: None for objects, () for sets."""
    raw = payload(COVER)
    for key in ("MetaData", "MediaProcessResultSet", "AiAnalysisResultSet"):
        raw.pop(key, None)
        if empty != "<missing>":
            raw[key] = empty
    task = parse(raw)
    assert task.meta_data is None
    assert task.media_process_results == ()
    assert task.ai_analysis_results == ()


def test_explicit_null_siblings_parse() -> None:
    """The 2019 sample, where every unused *Task and *ResultSet is null, parses fully."""
    task = task_of("ProcedureStateChanged-transcode-coverbysnapshot-explicit-nulls-2019.json")
    assert [r.kind for r in task.media_process_results] == ["Transcode", "CoverBySnapshot"]
    assert task.cover_url is not None
    assert task.ai_content_review_results == ()


def test_scalar_mismatches_read_as_none_or_converted() -> None:
    """Numeric strings convert, other mismatches read as None, booleans are not numbers."""
    raw = payload(COVER)
    raw["MetaData"].update(
        Height="1080", Width="wide", Bitrate=True, Duration="59.5", Size=7.0, Rotate=1.5
    )
    raw["MetaData"]["Container"] = {"not": "text"}
    meta = parse(raw).meta_data
    assert meta is not None
    assert (meta.height, meta.width, meta.bitrate, meta.duration) == (1080, None, None, 59.5)
    assert (meta.size, meta.rotate, meta.container) == (7, None, None)


def test_numbers_where_text_belongs_keep_their_digits() -> None:
    """A bare-integer FileId > 2**53 and an integer Status read as their exact text."""
    raw = payload(COVER)
    raw.update(FileId=5285485487985271490, Status=0)
    task = parse(raw)
    assert (task.file_id, task.status) == ("5285485487985271490", "0")
    assert raw["FileId"] == 5285485487985271490


def test_unknown_members_are_kept_in_raw() -> None:
    """Members procpoll does not know are ignored by the types and kept in raw."""
    raw = payload(COVER)
    raw["HologramSet"] = [{"deep": [[[]]]}]
    output = raw["MediaProcessResultSet"][0]["TranscodeTask"]["Output"]
    output["QuantumBitrate"] = "∞"
    task = parse(raw)
    assert task.raw["HologramSet"] == [{"deep": [[[]]]}]
    (out,) = task.outputs("Transcode")
    assert out.raw["QuantumBitrate"] == "∞"


def test_unknown_media_type_keeps_its_envelope() -> None:
    """An unknown media Type keeps its sub-task envelope; its Output stays raw."""
    raw = payload(COVER)
    raw["MediaProcessResultSet"].append(
        {
            "Type": "SuperResolution",
            "SuperResolutionTask": {"Status": "FAIL", "ErrCode": 1, "Output": {}},
        }
    )
    task = parse(raw)
    result = task.media_process_results[-1]
    assert (result.type, result.kind) == ("SuperResolution", "SuperResolution")
    assert result.task is not None
    assert (result.task.status, result.task.output) == ("FAIL", None)
    assert task.failed_subtasks[0].type == "SuperResolution"


def test_kind_is_inferred_when_type_is_missing() -> None:
    """Without Type, the kind follows the sub-task member that is present."""
    raw = payload(COVER)
    del raw["MediaProcessResultSet"][1]["Type"]
    result = parse(raw).media_process_results[1]
    assert (result.type, result.kind) == (None, "CoverBySnapshot")
    assert isinstance(result.task and result.task.output, CoverBySnapshotTaskOutput)


def test_scalar_sets_keep_only_scalars() -> None:
    """Items of a URL or number set that are not scalars are left out of the typed view."""
    raw = payload(SNAPSHOTS_2023)
    output = raw["MediaProcessResultSet"][1]["SampleSnapshotTask"]["Output"]
    output.update(ImageUrlSet=["a", None, 5, {"x": 1}, True], WaterMarkDefinition=["7", "x", 8])
    (out,) = parse(raw).outputs("SampleSnapshot")
    assert (out.image_urls, out.watermark_definitions) == (("a", "5"), (7, 8))


def test_parsing_never_mutates_the_payload() -> None:
    """Parsing leaves the source dict exactly as it was, and raw is that dict."""
    raw = wrong_type_base()
    before = copy.deepcopy(raw)
    task = parse(raw)
    assert raw == before
    assert task.raw is raw


@pytest.mark.parametrize(
    ("convert", "value", "expected"),
    [
        (as_text, 5285485487985271490, "5285485487985271490"),
        (as_text, 0, "0"),
        (as_text, False, None),
        pytest.param(as_text, 10**5000, None, id="as_text-5000-digits"),
        (as_int, "1080", 1080),
        (as_int, " 42 ", 42),
        (as_int, "1080.0", 1080),
        (as_int, 2.5, None),
        (as_int, True, None),
        (as_int, "9" * 5000, None),
        (as_float, "59.5", 59.5),
        (as_float, "nan", None),
        pytest.param(as_float, 10**400, None, id="as_float-400-digits"),
        (as_float, False, None),
    ],
)
def test_scalar_conversions(
    convert: Callable[[object], object], value: object, expected: object
) -> None:
    """The scalar readers convert what parses and return None, never raising, otherwise."""
    assert convert(value) == expected
