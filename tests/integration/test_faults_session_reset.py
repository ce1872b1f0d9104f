"""When the HPB replaces our session (resume refused, HPB restarted), captions
must reach the viewers again, and nothing may go to or name a session the HPB
no longer has. Real HPB link and room against the emulator; scripted speakers."""

from __future__ import annotations

import logging

import pytest

from live_transcription.api.health import HealthInputs, assess
from live_transcription.hpb.participants import ParticipantsState
from live_transcription.rooms import ports
from live_transcription.rooms.room import DELIVERY_STALL_SECONDS
from live_transcription.sim.client import SimClient
from tests.integration.session_support import ROOM, Env, restart_hpb_with_new_ids, room_on_emulator
from tests.integration.test_faults_support import metric
from tests.waiting import until

DEADLINE = 30.0


async def _call_with_viewer(env: Env, viewer_talk_session: str = "talk-viewer") -> None:
    for name in ("alice", "bob"):
        await env.hpb.add_participant(
            ROOM, session_id=name, nextcloud_session_id=f"talk-{name}", in_call=7, user_id=name
        )
    await env.manager.transcribe(ROOM, viewer_talk_session, True, "en")
    await until(lambda: set(env.speakers.live()) == {"alice", "bob"}, deadline=DEADLINE)
    await until(lambda: not env.room.pending_targets, deadline=DEADLINE)


async def _refuse_resume_once(env: Env) -> str:
    """Our socket drops and the HPB has forgotten us: returns the new session."""
    [old] = env.ours()
    env.hpb.refuse_resume = True
    env.hpb.drop(old)
    await env.hpb.wait_for(lambda: env.ours() not in ([], [old]), DEADLINE)
    env.hpb.refuse_resume = False
    [new] = env.ours()
    return new


def _texts(viewer: SimClient, speaker: str) -> list[str]:
    return [m["message"] for m in viewer.transcripts() if m["speakerSessionId"] == speaker]


async def test_refused_resume_then_same_participants_rebuild_the_mapping() -> None:
    """The HPB forgot our session; the others keep theirs and the same list is
    sent after our new join: it must map the viewer again."""
    async with room_on_emulator() as env, SimClient(env.hpb.url, ROOM, "talk-viewer") as viewer:
        await _call_with_viewer(env)
        first = env.speakers.live()
        first["alice"].say("before the drop")
        await viewer.wait_for(lambda: "before the drop" in _texts(viewer, "alice"), DEADLINE)

        await _refuse_resume_once(env)
        # fresh offers: a new speaker for each (the old ones were closed)
        await until(
            lambda: all(env.speakers.live().get(n) not in (None, first[n]) for n in ("alice", "bob")),
            deadline=DEADLINE,
        )
        await until(lambda: not env.room.pending_targets, deadline=DEADLINE)
        for name, speaker in env.speakers.live().items():
            speaker.say(f"after the reset from {name}")
        await viewer.wait_for(
            lambda: all(f"after the reset from {n}" in _texts(viewer, n) for n in ("alice", "bob")),
            DEADLINE,
        )
        assert env.room.speaker_ids == {"alice", "bob"}
        assert len(env.speakers.running()) == 2, "the old speakers ended"


async def test_after_hpb_restart_nothing_goes_to_or_names_an_old_session() -> None:
    """All HPB session ids change, the Talk ones stay. A caption queued during
    the outage (for the viewer's old session) and an old speaker's last final
    that flushes after the new session is mapped must not be sent."""
    async with room_on_emulator() as env:
        await env.hpb.add_participant(ROOM, session_id="viewer", nextcloud_session_id="talk-viewer")
        await _call_with_viewer(env)
        before = env.speakers.live()
        before["alice"].last_words = "old alice, late"
        before["alice"].hold.clear()
        [old_ours] = env.ours()

        await env.hpb.stop(forget_sessions=False)
        await until(lambda: env.room.link_state == "reconnecting", deadline=DEADLINE)
        before["bob"].say("queued while the HPB is away")  # still addressed to the old viewer
        renamed = await restart_hpb_with_new_ids(env.hpb, 1)
        old_sessions = set(renamed) | {old_ours}

        await until(
            lambda: set(env.speakers.live()) == {"alice~1", "bob~1"} and not env.room.pending_targets,
            deadline=DEADLINE,
        )
        [ours] = env.ours()
        before["alice"].hold.set()  # the old speaker's last final, late
        await until(before["alice"].finished.is_set, deadline=DEADLINE)
        for speaker in env.speakers.live().values():
            speaker.say(f"new {speaker.session_id}")

        def new_captions() -> set[str]:
            return {data["message"] for _, to, data in env.transcripts(ours) if to == "viewer~1"}

        await env.hpb.wait_for(lambda: {"new alice~1", "new bob~1"} <= new_captions(), DEADLINE)
        for _, recipient, data in env.transcripts(ours):
            assert recipient not in old_sessions, data
            assert data["speakerSessionId"] not in old_sessions, data
        assert env.room.speaker_ids == {"alice~1", "bob~1"}
        await until(lambda: len(env.speakers.running()) == 2, deadline=DEADLINE)


class ForgetfulParticipants(ParticipantsState):
    """The broken behaviour, injected: what the old session knew survives a reset."""

    def reset(self, own_session_id: str | None) -> list[ports.CallEvent]:
        self.own_session_id = own_session_id
        return []


async def test_health_sees_captions_stuck_behind_a_pending_target(caplog: pytest.LogCaptureFixture) -> None:
    """If the mapping is ever lost again, /healthz says degraded (still ready),
    the metric counts the stall once and one warning is logged."""
    caplog.set_level(logging.INFO, logger="live_transcription.rooms.room")
    async with (
        room_on_emulator(participants_state=ForgetfulParticipants) as env,
        SimClient(env.hpb.url, ROOM, "talk-viewer"),
    ):
        await _call_with_viewer(env)
        first = env.speakers.live()
        await _refuse_resume_once(env)
        await until(
            lambda: (
                all(env.speakers.live().get(n) not in (None, first[n]) for n in ("alice", "bob"))
                and env.room.link_state == "connected"
                and env.room.pending_targets == {"talk-viewer"}
            ),
            deadline=DEADLINE,
        )
        stalls_before = metric("live_transcription_delivery_stalls_total")
        dropped_before = metric("live_transcription_captions_dropped_total", {"reason": "no-target"})
        speaker = env.speakers.live()["alice"]
        speaker.say("nobody gets this")
        assert env.room.pending_targets == {"talk-viewer"}
        assert not env.manager.rooms()[0].delivery_stalled
        await env.clock.advance(DELIVERY_STALL_SECONDS + 1)
        for n in range(20):
            speaker.say(f"still nobody {n}")
        health = assess(_inputs(env))
        assert health.status == "degraded" and health.ready
        assert any("target without an HPB session" in reason for reason in health.reasons)
        assert metric("live_transcription_delivery_stalls_total") == stalls_before + 1
        assert (
            metric("live_transcription_captions_dropped_total", {"reason": "no-target"})
            == dropped_before + 21
        )
        warnings = [r for r in caplog.records if "have had no HPB session" in r.getMessage()]
        assert len(warnings) == 1

        # Talk asks again for the viewer: the stall is over
        await env.manager.transcribe(ROOM, "talk-viewer", False)
        await until(lambda: not env.manager.rooms()[0].delivery_stalled)
        assert assess(_inputs(env)).status == "ok"


def _inputs(env: Env) -> HealthInputs:
    return HealthInputs(
        rooms=env.manager.rooms(),
        missing_config=[],
        engine_name="scripted",
        engine_error=None,
        engine_ready=True,
        speakers_active=env.manager.admission.active,
        speakers_cap=env.manager.admission.max_speakers,
        speakers_refused=0,
        rss_bytes=0,
        enabled=True,
        accepting=True,
    )
