"""Outputs of VOD's seven media-process sub-task types, shaped like the published samples."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

MEDIA_PROCESS_TYPES = (
    "Transcode",
    "AnimatedGraphics",
    "SnapshotByTimeOffset",
    "SampleSnapshot",
    "ImageSprites",
    "CoverBySnapshot",
    "AdaptiveDynamicStreaming",
)
TASK_KEY = {
    "Transcode": "TranscodeTask",
    "AnimatedGraphics": "AnimatedGraphicTask",
    "SnapshotByTimeOffset": "SnapshotByTimeOffsetTask",
    "SampleSnapshot": "SampleSnapshotTask",
    "ImageSprites": "ImageSpriteTask",
    "CoverBySnapshot": "CoverBySnapshotTask",
    "AdaptiveDynamicStreaming": "AdaptiveDynamicStreamingTask",
}


def media_output(
    kind: str,
    definition: int,
    meta: dict[str, Any],
    *,
    rng: random.Random,
    url: Callable[[str], str],
) -> dict[str, Any]:
    """The Output of a successful `kind` sub-task for a source with MetaData `meta`."""
    md5 = f"{rng.getrandbits(128):032x}"
    if kind == "Transcode":
        return {
            "Url": url(f"v.f{definition}.mp4"),
            "Size": meta["Size"] // 2,
            "Container": "mov,mp4,m4a,3gp,3g2,mj2",
            "Height": meta["Height"],
            "Width": meta["Width"],
            "Bitrate": meta["Bitrate"] // 2,
            "Md5": md5,
            "Duration": meta["Duration"],
            "VideoStreamSet": [dict(stream) for stream in meta["VideoStreamSet"]],
            "AudioStreamSet": [dict(stream) for stream in meta["AudioStreamSet"]],
            "Definition": definition,
        }
    if kind == "AnimatedGraphics":
        return {
            "Url": url(f"v.f{definition}.gif"),
            "Definition": definition,
            "Container": "gif",
            "Height": 240,
            "Width": 320,
            "Bitrate": 324271,
            "Size": 121601,
            "Md5": md5,
            "StartTimeOffset": 3,
            "EndTimeOffset": 5,
        }
    if kind == "SnapshotByTimeOffset":
        offsets = sorted(rng.sample(range(1, 60), 3))
        return {
            "Definition": definition,
            "PicInfoSet": [{"TimeOffset": t, "Url": url(f"shot{t}.jpg")} for t in offsets],
        }
    if kind == "SampleSnapshot":
        return {
            "Definition": definition,
            "SampleType": "Percent",
            "Interval": 10,
            "WaterMarkDefinition": [],
            "ImageUrlSet": [url(f"sample{i}.jpg") for i in range(1, 4)],
        }
    if kind == "ImageSprites":
        return {
            "Definition": definition,
            "Height": 80,
            "Width": 142,
            "TotalCount": 1,
            "ImageUrlSet": [url("sprite1.jpg")],
            "WebVttUrl": url("sprite.vtt"),
        }
    if kind == "CoverBySnapshot":
        return {"CoverUrl": url("cover.jpg")}
    package = rng.choice(("hls", "dash"))
    return {
        "Definition": definition,
        "Package": package,
        "DrmType": rng.choice(("", "", "SimpleAES")),
        "Url": url(f"adp.{definition}.{'m3u8' if package == 'hls' else 'mpd'}"),
    }
