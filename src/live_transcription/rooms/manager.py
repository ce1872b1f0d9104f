"""The rooms of this process: opened on Talk's first request, closed when done.

The Manager owns the token -> Room map. HTTP handlers call its methods on
the same event loop; each method changes the map without awaiting in the
middle, so no lock is needed. Every room runs as a task of the Manager's
TaskGroup: leaving the Manager leaves every call.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Protocol, Self

from live_transcription import metrics
from live_transcription.clock import Clock, MonotonicClock
from live_transcription.logs import short_token
from live_transcription.rooms import ports
from live_transcription.rooms.admission import Admission
from live_transcription.rooms.joins import JoinHistory
from live_transcription.rooms.room import (
    AddTarget,
    Leave,
    RemoveTarget,
    Room,
    SetLanguage,
    SetTranslation,
    SpeakerFactory,
)
from live_transcription.stt.base import Language
from live_transcription.translation.room import TranslationSetup
from live_transcription.translation.translator import TranslationUnavailable

log = logging.getLogger(__name__)


class UnsupportedLanguage(ValueError):
    pass


class NoSuchRoom(LookupError):
    pass


class CapacityReached(RuntimeError):
    pass


class ProviderFailure(RuntimeError):
    """The STT provider cannot work at all (e.g. rejected credentials)."""


class JoinCancelled(RuntimeError):
    """The room was left (leave, disable, shutdown) before the HPB accepted the join."""


class NotCaptioned(LookupError):
    """The participant has not enabled captions in that room (Talk gets 412)."""


class RoomObserver(Protocol):
    """Told of each room's record (targets, language) and of its end: a
    cluster keeps them with the room's lease."""

    def room_changed(self, token: str, language: str, targets: frozenset[str]) -> None: ...

    def room_ended(self, token: str, reason: str) -> None: ...


@dataclass(frozen=True, slots=True)
class RoomSummary:
    token: str
    language: str
    targets: int
    pending_targets: int
    speakers: int
    waiting_speakers: int
    link_state: str
    speakers_reconnecting: int = 0
    """Speakers whose STT stream is retrying its connection."""
    speakers_connected: int = 0
    """Speakers whose media connection (ICE, DTLS) is up: audio flows."""
    delivery_stalled: bool = False
    """Connected, with captions to send, but a target pending for over 10 s."""


class Manager:
    def __init__(
        self,
        *,
        link_factory: ports.CallLinkFactory,
        speaker_factory: SpeakerFactory,
        languages: Mapping[str, Language],
        admission: Admission,
        default_language: str = "en",
        linger_seconds: float = 60.0,
        join_timeout: float = 30.0,
        max_rooms: int = 200,
        max_targets_per_room: int = 1000,
        clock: Clock | None = None,
        provider_failure: Callable[[], str | None] = lambda: None,
        translation: TranslationSetup | None = None,
        observer: RoomObserver | None = None,
    ) -> None:
        self._link_factory = link_factory
        self._speaker_factory = speaker_factory
        self.languages = dict(languages)
        self.admission = admission
        self.default_language = default_language if default_language in languages else next(iter(languages))
        self._linger_seconds = linger_seconds
        self._join_timeout = join_timeout
        self.max_rooms = max_rooms
        self._max_targets_per_room = max_targets_per_room
        self._clock = clock or MonotonicClock()
        self.joins = JoinHistory(self._clock)
        self._provider_failure = provider_failure
        self.translation = translation
        self.observer = observer
        self._rooms: dict[str, Room] = {}
        self._tasks: asyncio.TaskGroup | None = None
        self._accepting = False
        self.rooms_opened = 0
        """Rooms opened (join attempts); ``rooms_joined`` of them were joined."""
        self.rooms_joined = 0
        self.rooms_closed = 0

    # --- lifecycle --------------------------------------------------------------------------------
    async def __aenter__(self) -> Self:
        self._tasks = asyncio.TaskGroup()
        await self._tasks.__aenter__()
        self._accepting = True
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_accepting()
        for room in list(self._rooms.values()):
            room.stop("shutdown")
        assert self._tasks is not None
        await self._tasks.__aexit__(exc_type, exc, tb)
        self._tasks = None

    # --- Talk's requests --------------------------------------------------------------------------
    def check_language(self, language: str | None) -> str:
        if language is None:
            return self.default_language
        if language not in self.languages:
            supported = ", ".join(sorted(self.languages))
            raise UnsupportedLanguage(f"unsupported language {language!r} (supported: {supported})")
        return language

    async def transcribe(
        self,
        token: str,
        talk_session: str,
        enable: bool,
        language: str | None = None,
        translate_to: str | None = None,
    ) -> str:
        """Add or remove one target; opens the room on the first target.
        ``translate_to``: the target reads captions translated into it."""
        if not enable:
            room = self._rooms.get(token)
            if room is None:
                return "transcription was not enabled for this session"
            await room.send(RemoveTarget(talk_session))
            return "transcription disabled for this session"

        chosen = self.check_language(language)
        if translate_to is not None:
            current = self._rooms.get(token)
            await self.check_translation(
                translate_to, current.language if current and not language else chosen
            )
        failure = self._provider_failure()
        if failure is not None:
            raise ProviderFailure(failure)
        room = await self._current(token)
        if room is None:
            room = self._open(token, chosen)
        elif language is not None and language != room.language:
            await room.send(SetLanguage(chosen))
        if (
            not room.has_target(talk_session)
            and room.target_count + room.adds_in_flight >= self._max_targets_per_room
        ):
            raise CapacityReached(f"cap of {self._max_targets_per_room} caption viewers per room reached")
        await room.send(AddTarget(talk_session))
        try:
            async with asyncio.timeout(self._join_timeout):
                await room.wait_joined()
        except TimeoutError:
            error = ports.HpbUnavailable("timed out joining the call through the HPB")
            self.joins.failed(room, error)
            await self._give_up(room, "join-timeout")
            raise error from None
        except ports.HpbUnavailable:
            if room.closed_reason in _LEFT_ON_PURPOSE:
                left = f"the call was left before it was joined ({room.closed_reason})"
                raise JoinCancelled(left) from None
            raise
        if translate_to is not None:
            await self._set_translation(room, talk_session, translate_to)
        return "transcription enabled for this session"

    async def set_language(self, token: str, language: str) -> None:
        chosen = self.check_language(language)
        room = self._rooms.get(token)
        if room is None:
            raise NoSuchRoom("no active transcription in this room")
        await room.send(SetLanguage(chosen))

    async def check_translation(self, target: str, room_language: str) -> None:
        """Raise ``TranslationUnavailable`` (no provider) or ``UnsupportedLanguage``
        (not offered, or the room's own language)."""
        if self.translation is None:
            raise TranslationUnavailable("translation is not configured")
        try:
            languages = await self.translation.translator.languages()
        except TranslationUnavailable:
            raise
        except Exception as exc:  # cannot tell now: Talk treats 550 as "not supported"
            raise TranslationUnavailable(str(exc)) from exc
        if target == room_language:
            raise UnsupportedLanguage(f"{target!r} is already the language of the call")
        if target not in languages.target:
            raise UnsupportedLanguage(f"translation into {target!r} is not offered by the provider")
        if languages.origin_for(room_language) is None:
            raise UnsupportedLanguage(f"the provider cannot translate from {room_language!r}")

    async def set_target_language(self, token: str, talk_session: str, target: str | None) -> None:
        """One target reads captions translated into ``target`` (None: the originals)."""
        room = await self._current(token)
        if room is None:
            raise NoSuchRoom("no active transcription in this room")
        if target is not None:
            await self.check_translation(target, room.language)
        await self._set_translation(room, talk_session, target)

    async def _set_translation(self, room: Room, talk_session: str, target: str | None) -> None:
        reply: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        await room.send(SetTranslation(talk_session, target, reply))
        try:
            async with asyncio.timeout(self._join_timeout):
                answer = await reply
        except TimeoutError:
            answer = "room-closed"
        if answer == "room-closed":
            raise NoSuchRoom("no active transcription in this room")
        if answer == "not-a-target":
            raise NotCaptioned("this participant has not enabled captions in this room")
        if answer == "same-language":
            raise UnsupportedLanguage(f"{target!r} is already the language of the call")

    def translation_in_use(self) -> tuple[int, int]:
        """(target languages read, readers), summed over rooms."""
        return (
            sum(len(room.translation_languages) for room in self._rooms.values()),
            sum(room.translation_readers for room in self._rooms.values()),
        )

    async def resume(self, token: str, language: str | None, targets: frozenset[str]) -> bool:
        """Re-open a room another replica ran, with its targets and language,
        without a request from Talk; True once the call is joined."""
        chosen = language if language in self.languages else self.default_language
        room = await self._current(token)
        try:
            if room is None:
                room = self._open(token, chosen)
            elif room.language != chosen:
                await room.send(SetLanguage(chosen))
        except CapacityReached as exc:
            log.warning("room %s cannot be re-opened here: %s", short_token(token), exc)
            return False
        for talk_session in sorted(targets)[: self._max_targets_per_room]:
            await room.send(AddTarget(talk_session))
        try:
            async with asyncio.timeout(self._join_timeout):
                await room.wait_joined()
        except TimeoutError:
            self.joins.failed(room, ports.HpbUnavailable("timed out joining the call through the HPB"))
            await self._give_up(room, "join-timeout")
            return False
        except ports.HpbUnavailable:
            return False
        return True

    def stop_room(self, token: str, reason: str) -> None:
        """Leave the call now without waiting (another replica may own the room)."""
        room = self._rooms.get(token)
        if room is not None:
            if room.joining:
                self.joins.abandoned(room)
            room.stop(reason)

    async def leave(self, token: str, reason: str = "leave") -> bool:
        """Leave the call; a join still pending is cancelled at once."""
        room = self._rooms.get(token)
        if room is None:
            return False
        if room.joining:
            self.joins.abandoned(room)
            room.stop(reason)
        else:
            await room.send(Leave(reason))
        return True

    def stop_accepting(self) -> None:
        """Shutdown begins: no new room, and joins still pending are given up."""
        self._accepting = False
        for room in list(self._rooms.values()):
            if room.joining:
                self.joins.abandoned(room)
                room.stop("shutdown")

    # --- views ------------------------------------------------------------------------------------
    def rooms(self) -> list[RoomSummary]:
        return [
            RoomSummary(
                token=room.token,
                language=room.language,
                targets=room.target_count,
                pending_targets=len(room.pending_targets),
                speakers=len(room.speaker_ids),
                waiting_speakers=len(room.waiting_speakers),
                link_state=room.link_state,
                speakers_reconnecting=room.reconnecting_speakers,
                speakers_connected=room.connected_speakers,
                delivery_stalled=room.delivery_stalled,
            )
            for room in self._rooms.values()
        ]

    def room(self, token: str) -> Room | None:
        return self._rooms.get(token)

    @property
    def room_count(self) -> int:
        return len(self._rooms)

    @property
    def accepting(self) -> bool:
        return self._accepting

    # --- internals --------------------------------------------------------------------------------
    async def _current(self, token: str) -> Room | None:
        """The room of ``token`` that still takes targets: a room that is
        closing (lingered out, call ended) is waited for, so that a new one
        opens instead of a target being lost with it."""
        while (room := self._rooms.get(token)) is not None and room.closing:
            await room.wait_closed()
        return room

    def _open(self, token: str, language: str) -> Room:
        if not self._accepting or self._tasks is None:
            raise CapacityReached("the service is shutting down")
        if len(self._rooms) >= self.max_rooms:
            raise CapacityReached(f"room cap of {self.max_rooms} reached")
        room = Room(
            token,
            language,
            link_factory=self._link_factory,
            speaker_factory=self._speaker_factory,
            admission=self.admission,
            clock=self._clock,
            linger_seconds=self._linger_seconds,
            on_link_event=self.joins.link_event,
            translation=self.translation,
            on_record=None if self.observer is None else self._record_changed,
        )
        self._rooms[token] = room
        self.rooms_opened += 1
        self.joins.started(room)
        room.add_join_callback(lambda error: self._join_settled(room, error))
        room.task = self._tasks.create_task(self._run_room(room), name=f"room-{token[:4]}")
        # a callback, not a finally: a task cancelled before its first step runs no code
        room.task.add_done_callback(lambda _: self._room_ended(room))
        return room

    async def _run_room(self, room: Room) -> None:
        try:
            await room.run()
        except Exception:
            log.exception("room task failed")

    def _room_ended(self, room: Room) -> None:
        if self._rooms.get(room.token) is room:
            del self._rooms[room.token]
            if self.observer is not None:
                self.observer.room_ended(room.token, room.closed_reason or "unknown")
        self.rooms_closed += 1
        metrics.rooms_closed.labels(room.closed_reason or "unknown").inc()

    def _record_changed(self, room: Room) -> None:
        if self.observer is not None and self._rooms.get(room.token) is room:
            self.observer.room_changed(room.token, room.language, room.targets)

    def _join_settled(self, room: Room, error: BaseException | None) -> None:
        if error is not None:
            self.joins.failed(room, error)
        elif self.joins.succeeded(room):
            self.rooms_joined += 1
            metrics.rooms_opened.inc()

    async def _give_up(self, room: Room, reason: str) -> None:
        room.stop(reason)


_LEFT_ON_PURPOSE = ("leave", "disabled", "shutdown")
