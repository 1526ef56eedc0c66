"""VOD's vocabulary for sink filters: the event types it documents, the task-flow statuses,
and the test that tells a typo from a name VOD may add later."""

from __future__ import annotations

import difflib
from collections.abc import Iterable

DOCUMENTED_EVENT_TYPES: tuple[str, ...] = (
    "NewFileUpload", "ProcedureStateChanged", "FileDeleted", "RestoreMediaComplete",
    "PullComplete", "EditMediaComplete", "SplitMediaComplete", "ComposeMediaComplete",
    "WechatMiniProgramPublishComplete", "RemoveWatermark", "RebuildMediaComplete",
    "ReviewAudioVideoComplete", "ExtractTraceWatermarkComplete",
    "ExtractCopyRightWatermarkComplete", "DescribeFileAttributesComplete",
    "QualityInspectComplete", "QualityEnhanceComplete", "PersistenceComplete",
    "ComplexAdaptiveDynamicStreamingComplete", "ProcessMediaByMPSComplete",
    "AigcImageTaskComplete", "AigcVideoTaskComplete", "DescribeAigcFaceInfoAsyncComplete",
    # Kept for accounts created before the 2018 API ("2017-compatible").
    "TranscodeComplete", "ConcatComplete", "ClipComplete", "CreateImageSpriteComplete",
    "CreateSnapshotByTimeOffsetComplete",
)
"""The EventType enumeration of the current API documentation (SDK 3.1.162)."""

OTHER_EVENT_TYPES: tuple[str, ...] = (
    # Dropped from the enumeration, or named only by a payload field's documentation.
    "WechatPublishComplete", "FastClipMediaComplete", "MediaCastStatusChanged",
    "ExtractBlindWatermarkComplete", "SceneAigcImageCompleteEvent",
    "ProcessImageAsyncCompleteEvent", "CreateAigcAdvancedCustomElementCompleteEvent",
    "CreateAigcCustomVoiceCompleteEvent",
)
"""Types VOD has sent or documents elsewhere: accepted in filters, never warned about."""

KNOWN_EVENT_TYPES: tuple[str, ...] = DOCUMENTED_EVENT_TYPES + OTHER_EVENT_TYPES

PROCEDURE_STATUSES: tuple[str, ...] = ("PROCESSING", "FINISH")
"""ProcedureTask.Status, the only status a sink's `statuses` filter compares."""

TYPO_SIMILARITY = 0.88
"""A name at least this similar to a known type is taken for a typo of it.

Above 0.857, the similarity of the closest two distinct known types
(EditMediaComplete and SplitMediaComplete): a new VOD type is as different from its
neighbours as today's types are from each other, so it gets a warning, not an error.
"""


def closest(name: str, known: Iterable[str], cutoff: float = TYPO_SIMILARITY) -> str | None:
    """The entry of `known` that `name` is most likely a misspelling of, if any.

    Case is ignored, so `procedurestatechanged` finds `ProcedureStateChanged`.
    """
    by_folded = {entry.casefold(): entry for entry in known}
    found = difflib.get_close_matches(name.casefold(), by_folded, n=1, cutoff=cutoff)
    return by_folded[found[0]] if found else None
