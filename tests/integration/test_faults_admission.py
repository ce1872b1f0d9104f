"""Admission control over real sockets: when a cap is reached, a new speaker
is refused with a logged reason and a metric, the captioned ones keep going,
and the refused one is captioned as soon as a slot frees up."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from live_transcription.sim.client import SimClient
from tests.integration.test_faults_support import DEADLINE, captioned_call, finals, metric
from tests.waiting import until

ROOM = "capsroom"


@pytest.mark.parametrize(
    ("setting", "kind", "health_reason"),
    [
        ("LT_MAX_SPEAKERS", "process-cap", "speaker cap of 2 reached"),
        ("LT_MAX_SPEAKERS_PER_ROOM", "room-cap", "1 speaker(s) waiting for captioning"),
    ],
)
async def test_cap_refuses_new_speakers_and_spares_the_others(  # noqa: PLR0917 - fixtures
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    setting: str,
    kind: str,
    health_reason: str,
) -> None:
    caplog.set_level(logging.INFO)
    refused_before = metric("live_transcription_speakers_refused_total", {"reason": kind})
    speakers = ("alice", "bob", "carol")
    async with (
        captioned_call(tmp_path, monkeypatch, ROOM, speakers, **{setting: 2}) as call,
        SimClient(call.hpb.url, ROOM, "talk-viewer") as viewer,
    ):
        manager = call.runtime.manager
        await manager.transcribe(ROOM, "talk-viewer", True, "en")
        room = manager.room(ROOM)
        assert room is not None
        await until(lambda: room.stats.speakers_refused >= 1 and len(room.speaker_ids) == 2, DEADLINE)
        [refused] = room.waiting_speakers
        admitted = sorted(room.speaker_ids)

        # refused: counted, logged once per attempt with the reason and the ids
        assert metric("live_transcription_speakers_refused_total", {"reason": kind}) > refused_before
        lines = [r for r in caplog.records if getattr(r, "refusal", None) == kind]
        assert lines and all(getattr(r, "speaker", None) == refused for r in lines)
        assert all(getattr(r, "room", None) == "caps…" for r in lines)
        health = call.runtime.health()[0]
        assert health.status == "degraded" and health_reason in health.reasons

        # the admitted speakers keep being captioned; the refused one is not
        seen = len(viewer.transcripts())
        await viewer.wait_for(
            lambda: all(finals(viewer.transcripts()[seen:], who) >= 2 for who in admitted),
            deadline=DEADLINE,
        )
        assert finals(viewer.transcripts(), refused) == 0
        assert manager.admission.active == 2

        # a slot frees up: the waiting speaker gets it
        await call.hpb.set_in_call(admitted[0], 0)
        await until(lambda: room.speaker_ids == {admitted[1], refused}, deadline=DEADLINE)
        await viewer.wait_for(lambda: finals(viewer.transcripts(), refused) >= 1, deadline=DEADLINE)
        assert call.runtime.health()[0].status == ("degraded" if kind == "process-cap" else "ok")
        await manager.leave(ROOM)
        await until(lambda: manager.rooms() == [], deadline=DEADLINE)
