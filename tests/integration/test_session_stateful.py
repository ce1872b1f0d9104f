"""A stateful property test of the HPB link and the room against the HPB
emulator: random interleavings of signaling faults and call changes. After
each step settles, captions reach exactly the enabled targets in the room,
nothing goes to or names a session the HPB no longer has, the speakers are
the participants in the call with audio, and gone speakers are freed.

Bounded, and derandomized when ``CI`` is set (a fixed seed, same examples);
``LT_STATEFUL_EXAMPLES`` asks for more examples when hunting by hand."""

from __future__ import annotations

import asyncio
import itertools
import os
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, precondition, rule

from live_transcription.hpb.protocol import IN_CALL, WITH_AUDIO
from live_transcription.sim.emulator import HpbEmulator, Json
from tests.integration.session_support import ROOM, Env, restart_hpb_with_new_ids, room_on_emulator

SETTLE_SECONDS = 20.0
SPEAKING = IN_CALL | WITH_AUDIO
FLAGS = st.sampled_from([0, IN_CALL, SPEAKING, SPEAKING | 4])


class CheckingEmulator(HpbEmulator):
    """Records every transcript sent to, or naming, a session it does not have
    in the room at the moment it arrives."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.violations: list[Json] = []

    def _in_room(self, session_id: object) -> bool:
        session = self._sessions.get(session_id) if isinstance(session_id, str) else None
        return session is not None and session.room == ROOM

    async def _message(self, session: Any, msg_id: object, body: Json) -> None:
        data = body.get("data")
        recipient = body.get("recipient")
        if isinstance(data, dict) and data.get("type") == "transcript" and isinstance(recipient, dict):
            target, speaker = recipient.get("sessionid"), data.get("speakerSessionId")
            if not (self._in_room(target) and self._in_room(speaker)):
                self.violations.append(body)
        await super()._message(session, msg_id, body)


@dataclass
class Person:
    talk: str
    sid: str
    flags: int


class SignalingFaults(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.stack = AsyncExitStack()
        self.env: Env | None = None
        self.people: dict[str, Person] = {}
        self.targets: set[str] = set()
        self.language = "en"
        self.room_open = False
        self.names = itertools.count(1)
        self.probes = itertools.count(1)

    # --- plumbing --------------------------------------------------------------------------
    def run(self, coro: Any) -> Any:
        return self.loop.run_until_complete(coro)

    @property
    def e(self) -> Env:
        assert self.env is not None
        return self.env

    @property
    def violations(self) -> list[Json]:
        hpb = self.e.hpb
        assert isinstance(hpb, CheckingEmulator)
        return hpb.violations

    def teardown(self) -> None:
        try:
            if self.env is not None:
                self.run(self.stack.aclose())
                self.run(self._nothing_left())
        finally:
            self.loop.close()

    async def _nothing_left(self) -> None:
        """Every room, link, speaker and emulator task has ended."""
        others = asyncio.all_tasks() - {asyncio.current_task()}
        if others:
            await asyncio.wait(others, timeout=SETTLE_SECONDS)
        assert sorted(t.get_name() for t in others if not t.done()) == []

    def step(self, coro: Any) -> None:
        async def act_then_check() -> None:
            async with asyncio.timeout(SETTLE_SECONDS * 3):
                await coro
                await self._settle()
                await self._probe()

        self.run(act_then_check())

    async def _ours(self) -> str:
        await self.e.hpb.wait_for(lambda: len(self.e.ours()) == 1, SETTLE_SECONDS)
        [ours] = self.e.ours()
        return ours

    # --- the invariants ----------------------------------------------------------------------
    def _expected_speakers(self) -> set[str]:
        return {p.sid for p in self.people.values() if p.flags & SPEAKING == SPEAKING}

    def _settled(self) -> bool:
        e = self.e
        running = sorted(s.session_id for s in e.speakers.running())
        if not self.room_open:
            return e.manager.rooms() == [] and running == [] and e.manager.admission.active == 0
        room = e.manager.room(ROOM)
        ours = e.ours()
        speakers = self._expected_speakers()
        return (
            room is not None
            and room.link_state == "connected"
            and len(ours) == 1
            and e.hpb.connected(ours[0])
            and room.speaker_ids == speakers
            and running == sorted(speakers)
            and e.manager.admission.active == len(speakers)
            and room.target_count == len(self.targets)
            and not room.pending_targets
            and room.resolved_targets == {self.people[talk].sid for talk in self.targets}
            and room.language == self.language
        )

    async def _settle(self) -> None:
        try:
            async with asyncio.timeout(SETTLE_SECONDS):
                while not self._settled():  # noqa: ASYNC110 (state of several owners)
                    await asyncio.sleep(0.005)
        except TimeoutError:
            raise AssertionError(f"did not settle: {self._describe()}") from None
        assert self.violations == [], self.violations

    def _describe(self) -> str:
        e = self.e
        room = e.manager.room(ROOM)
        return repr(
            {
                "people": self.people,
                "targets": self.targets,
                "room_open": self.room_open,
                "room": None
                if room is None
                else {
                    "link": room.link_state,
                    "speakers": sorted(room.speaker_ids),
                    "targets": room.target_count,
                    "pending": room.pending_targets,
                    "resolved": sorted(room.resolved_targets),
                    "language": room.language,
                },
                "running": sorted(s.session_id for s in e.speakers.running()),
                "ours": e.ours(),
            }
        )

    async def _probe(self) -> None:
        """Every speaker says one line: every enabled target gets it, nobody else."""
        if not self.room_open:
            return
        e = self.e
        ours = await self._ours()
        speakers = e.speakers.live()
        if not speakers:
            return
        room = e.manager.room(ROOM)
        assert room is not None
        dropped_before = room.stats.captions_without_target
        n = next(self.probes)
        for sid, speaker in speakers.items():
            speaker.say(f"probe {n} of {sid}")
        recipients = {self.people[talk].sid for talk in self.targets}
        expected = {(to, f"probe {n} of {sid}") for to in recipients for sid in speakers}

        def arrived() -> set[tuple[str, str]]:
            return {
                (to, data["message"])
                for _, to, data in e.transcripts(ours)
                if data["message"].startswith(f"probe {n} ")
            }

        await e.hpb.wait_for(lambda: expected <= arrived(), SETTLE_SECONDS)
        assert arrived() == expected, "a caption reached somebody who is not a target"
        for _, _to, data in e.transcripts(ours):
            if data["message"].startswith(f"probe {n} "):
                assert data["langId"] == self.language
                assert data["speakerSessionId"] in speakers
        if not recipients:
            assert room.stats.captions_without_target == dropped_before + len(speakers)
        assert self.violations == []

    # --- setup ---------------------------------------------------------------------------------
    @initialize()
    def start(self) -> None:
        async def begin() -> None:
            self.env = await self.stack.enter_async_context(room_on_emulator(CheckingEmulator))
            self.env.speakers.flush_on_close = True  # closing speakers race with what follows
            for flags in (SPEAKING, SPEAKING | 4, IN_CALL):
                await self._add(flags)
            listener = next(p for p in self.people.values() if p.flags == IN_CALL)
            await self._enable(listener.talk)

        self.step(begin())

    async def _add(self, flags: int) -> Person:
        n = next(self.names)
        person = Person(f"talk-p{n}", f"p{n}", flags)
        await self.e.hpb.add_participant(
            ROOM, session_id=person.sid, nextcloud_session_id=person.talk, in_call=flags
        )
        self.people[person.talk] = person
        return person

    async def _enable(self, talk: str) -> None:
        await self.e.manager.transcribe(ROOM, talk, True, self.language)
        self.targets.add(talk)
        self.room_open = True

    def _pick(self, data: st.DataObject, among: set[str] | None = None) -> Person:
        names = sorted(self.people if among is None else among)
        return self.people[data.draw(st.sampled_from(names))]

    # --- participants --------------------------------------------------------------------------
    @precondition(lambda self: len(self.people) < 6)
    @rule(flags=FLAGS)
    def participant_joins(self, flags: int) -> None:
        self.step(self._add(flags))

    @precondition(lambda self: self.people)
    @rule(data=st.data())
    def participant_leaves(self, data: st.DataObject) -> None:
        person = self._pick(data)
        del self.people[person.talk]
        self.targets.discard(person.talk)  # the Talk session left: not a target any more
        self.step(self.e.hpb.remove_participant(person.sid))

    @precondition(lambda self: self.people)
    @rule(data=st.data(), flags=FLAGS)
    def participant_changes_flags(self, data: st.DataObject, flags: int) -> None:
        """Mute, unmute, leave or join the call."""
        person = self._pick(data)
        person.flags = flags
        self.step(self.e.hpb.set_in_call(person.sid, flags))

    @precondition(lambda self: self.people)
    @rule(data=st.data())
    def participant_announced_again(self, data: st.DataObject) -> None:
        person = self._pick(data)
        self.step(self.e.hpb.set_in_call(person.sid, person.flags))

    @precondition(lambda self: self.people)
    @rule(data=st.data())
    def participant_session_replaced(self, data: st.DataObject) -> None:
        """The browser reconnected: a new HPB session for the same Talk
        session appears, then the old one goes."""
        person = self._pick(data)
        old, person.sid = person.sid, f"{person.sid.split('~')[0]}~{next(self.names)}"

        async def replace() -> None:
            await self.e.hpb.add_participant(
                ROOM, session_id=person.sid, nextcloud_session_id=person.talk, in_call=person.flags
            )
            await self.e.hpb.remove_participant(old)

        self.step(replace())

    # --- Talk's requests -----------------------------------------------------------------------
    @precondition(lambda self: len(self.targets) < len(self.people))
    @rule(data=st.data())
    def target_enabled(self, data: st.DataObject) -> None:
        person = self._pick(data, set(self.people) - self.targets)
        self.step(self._enable(person.talk))

    @precondition(lambda self: self.targets)
    @rule(data=st.data())
    def target_disabled(self, data: st.DataObject) -> None:
        person = self._pick(data, self.targets)
        self.targets.discard(person.talk)
        self.step(self.e.manager.transcribe(ROOM, person.talk, False))

    @precondition(lambda self: self.room_open)
    @rule(language=st.sampled_from(["en", "fr"]))
    def language_changed(self, language: str) -> None:
        self.language = language
        self.step(self.e.manager.set_language(ROOM, language))

    @precondition(lambda self: self.room_open)
    @rule()
    def call_ended(self) -> None:
        for person in self.people.values():
            person.flags = 0
        self.targets.clear()
        self.room_open = False
        self.step(self.e.hpb.end_call(ROOM))

    # --- faults --------------------------------------------------------------------------------
    @precondition(lambda self: self.room_open)
    @rule(resume_accepted=st.booleans())
    def socket_dropped(self, resume_accepted: bool) -> None:
        async def drop() -> None:
            hpb = self.e.hpb
            ours = await self._ours()
            hpb.refuse_resume = not resume_accepted
            try:
                hpb.drop(ours)
                if resume_accepted:
                    await hpb.wait_for(lambda: not hpb.connected(ours), SETTLE_SECONDS)
                    await hpb.wait_for(lambda: hpb.connected(ours), SETTLE_SECONDS)
                else:
                    await hpb.wait_for(lambda: self.e.ours() not in ([], [ours]), SETTLE_SECONDS)
            finally:
                hpb.refuse_resume = False

        self.step(drop())

    @precondition(lambda self: self.room_open)
    @rule()
    def hpb_restarted(self) -> None:
        async def restart() -> None:
            ours = await self._ours()
            renamed = await restart_hpb_with_new_ids(self.e.hpb, next(self.names))
            for person in self.people.values():
                person.sid = renamed[person.sid]
            await self.e.hpb.wait_for(lambda: self.e.ours() not in ([], [ours]), SETTLE_SECONDS)

        self.step(restart())


SignalingFaults.TestCase.settings = settings(
    max_examples=int(os.environ.get("LT_STATEFUL_EXAMPLES", "25")),
    stateful_step_count=15,
    deadline=None,
    derandomize=bool(os.environ.get("CI")),
    suppress_health_check=[HealthCheck.too_slow],
)
TestSignalingFaults = SignalingFaults.TestCase
