"""One call being captioned: owns its HPB link, its speakers, targets and language.

The room's state is changed by its own main loop only. Talk's requests
(through the Manager) and the link's events both arrive in one bounded inbox
(senders wait when it is full: control messages apply backpressure). Each
speaker runs as a task of the room's TaskGroup, so leaving ``run()`` ends
every speaker, the link and the timers, on every path.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from live_transcription import metrics
from live_transcription.clock import Clock
from live_transcription.logs import fields, short_token
from live_transcription.rooms import ports
from live_transcription.rooms.admission import Admission
from live_transcription.rooms.targets import TargetBook
from live_transcription.translation.room import RoomTranslations, TranslationSetup

log = logging.getLogger(__name__)

INBOX_SIZE = 256
DELIVERY_STALL_SECONDS = 10.0
"""A connected room with captions to send and a target still pending for
longer than this is stalled: Talk asked, but the HPB mapping never came."""


# --- what a room asks of a speaker ------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SpeakerContext:
    """Everything a speaker needs from its room, and nothing it could mutate."""

    room_token: str
    session_id: str
    offer: ports.OfferReceived
    language: str
    link: ports.CallLink
    publish: Callable[[str, str, bool], None]
    """``publish(speaker_session, text, final)``: send a caption to the targets."""


class SpeakerSession(Protocol):
    """One speaker's media, STT stream and caption builder (rooms/speaker.py)."""

    async def run(self) -> None:
        """Answer the offer and caption until closed or failed; flushes on exit."""
        ...

    def add_candidate(self, candidate: ports.CandidateReceived) -> None: ...

    def set_language(self, language: str) -> None: ...

    def close(self) -> None:
        """Ask ``run`` to flush and return. Idempotent."""
        ...


SpeakerFactory = Callable[[SpeakerContext], SpeakerSession]


# --- commands from the Manager ----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AddTarget:
    talk_session: str


@dataclass(frozen=True, slots=True)
class RemoveTarget:
    talk_session: str


@dataclass(frozen=True, slots=True)
class SetLanguage:
    language: str


@dataclass(frozen=True, slots=True)
class SetTranslation:
    """A target reads captions translated into ``language`` (None: the
    originals). ``reply`` gets ``ok``, ``not-a-target`` or ``same-language``."""

    talk_session: str
    language: str | None
    reply: asyncio.Future[str]


@dataclass(frozen=True, slots=True)
class Leave:
    reason: str = "leave"


@dataclass(frozen=True, slots=True)
class _LingerExpired:
    generation: int


@dataclass(frozen=True, slots=True)
class _LinkClosed:
    error: str | None


@dataclass(frozen=True, slots=True)
class _SpeakerEnded:
    session_id: str
    speaker: SpeakerSession


Command = AddTarget | RemoveTarget | SetLanguage | SetTranslation | Leave
_Item = Command | ports.CallEvent | _LingerExpired | _LinkClosed | _SpeakerEnded


@dataclass(slots=True)
class RoomStats:
    captions_sent: int = 0
    captions_without_target: int = 0
    speakers_refused: int = 0
    speakers_started: int = 0
    events_skipped: int = 0


class Room:
    def __init__(
        self,
        token: str,
        language: str,
        *,
        link_factory: ports.CallLinkFactory,
        speaker_factory: SpeakerFactory,
        admission: Admission,
        clock: Clock,
        linger_seconds: float,
        on_link_event: Callable[[Room, ports.LinkState | ports.ReconnectFailed], None] = (
            lambda room, event: None
        ),
        translation: TranslationSetup | None = None,
        on_record: Callable[[Room], None] | None = None,
    ) -> None:
        self.token = token
        self.language = language
        self._link_factory = link_factory
        self._speaker_factory = speaker_factory
        self._admission = admission
        self._clock = clock
        self._linger_seconds = linger_seconds
        self._on_link_event = on_link_event
        self._on_record = on_record
        """Told when the targets or the language change (a cluster keeps them
        with the room's lease); None in a single process."""

        self._inbox: asyncio.Queue[_Item] = asyncio.Queue(maxsize=INBOX_SIZE)
        self._joined: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._link: ports.CallLink | None = None
        self._targets = TargetBook()
        self._wanted: set[str] = set()  # in call with audio, per the HPB
        self._reserved: set[str] = set()  # offer requested, slot held, not arrived yet
        self._unavailable: set[str] = set()  # the HPB refused their offer: not asked again
        self._speakers: dict[str, SpeakerSession] = {}
        self._translation = translation
        self._translations: RoomTranslations | None = None
        self._reading: dict[str, str] = {}  # target (Talk session) -> language it reads
        self._linger_generation = 0
        self._linger_task: asyncio.Task[None] | None = None
        self.link_state = "connecting"
        self.closing = False
        """The room decided to end (it no longer takes targets); it is still
        saying bye until its task ends."""
        self._adds_in_flight = 0  # AddTarget sent but not applied yet: do not linger out
        self.closed_reason: str | None = None
        self._pending_with_captions_since: float | None = None
        self._stall_reported = False
        self.stats = RoomStats()
        self.task: asyncio.Task[None] | None = None
        """The task running ``run()``, set by whoever starts it."""

    # --- read-only views --------------------------------------------------------------------------
    @property
    def target_count(self) -> int:
        return len(self._targets)

    @property
    def targets(self) -> frozenset[str]:
        """Talk session ids of the targets (resolved or pending)."""
        return self._targets.talk_sessions()

    @property
    def pending_targets(self) -> set[str]:
        return self._targets.pending

    @property
    def resolved_targets(self) -> frozenset[str]:
        """HPB session ids the next caption goes to."""
        return frozenset(self._targets.resolved())

    @property
    def delivery_stalled(self) -> bool:
        """Connected, captions to send, and a target pending for too long."""
        since = self._pending_with_captions_since
        return (
            since is not None
            and self.link_state == "connected"
            and bool(self._targets.pending)
            and self._clock.now() - since > DELIVERY_STALL_SECONDS
        )

    @property
    def speaker_ids(self) -> frozenset[str]:
        return frozenset(self._speakers)

    @property
    def connected_speakers(self) -> int:
        """Speakers whose media connection is up (test fakes report none)."""
        return sum(1 for s in self._speakers.values() if getattr(s, "media_connected", False))

    @property
    def reconnecting_speakers(self) -> int:
        """Speakers whose STT stream is retrying its connection (sessions
        without an STT stream of their own, like test fakes, report none)."""
        return sum(1 for s in self._speakers.values() if getattr(s, "stt_reconnecting", False))

    @property
    def translations(self) -> RoomTranslations | None:
        """The room's translation worker while the room runs (None without a provider setup)."""
        return self._translations

    @property
    def translation_languages(self) -> frozenset[str]:
        """Target languages read by at least one target (not the room's own)."""
        return frozenset(lang for lang in self._reading.values() if lang != self.language)

    @property
    def translation_readers(self) -> int:
        return sum(1 for lang in self._reading.values() if lang != self.language)

    @property
    def waiting_speakers(self) -> frozenset[str]:
        """In call with audio but not captioned: a cap was reached."""
        return frozenset(self._wanted - self._speakers.keys() - self._reserved - self._unavailable)

    @property
    def joining(self) -> bool:
        """The HPB has not accepted the join yet (nor has it failed)."""
        return not self._joined.done()

    def has_target(self, talk_session: str) -> bool:
        return talk_session in self._targets

    @property
    def adds_in_flight(self) -> int:
        return self._adds_in_flight

    # --- the Manager's side -----------------------------------------------------------------------
    def add_join_callback(self, callback: Callable[[BaseException | None], None]) -> None:
        """``callback(None)`` once joined, ``callback(error)`` when joining failed."""

        def settled(joined: asyncio.Future[None]) -> None:
            callback(ports.HpbUnavailable("cancelled") if joined.cancelled() else joined.exception())

        self._joined.add_done_callback(settled)

    async def wait_joined(self) -> None:
        """Return once the room is joined; raise ``HpbUnavailable`` if joining failed."""
        await asyncio.shield(self._joined)

    async def send(self, command: Command) -> None:
        """Queue a command for the room's loop (waits while the inbox is full)."""
        if not isinstance(command, AddTarget):
            await self._inbox.put(command)
            return
        self._adds_in_flight += 1
        try:
            await self._inbox.put(command)
        except BaseException:
            self._adds_in_flight -= 1
            raise

    async def wait_closed(self) -> None:
        """Return once the room's task has ended (it has said bye)."""
        if self.task is not None:
            await asyncio.wait({self.task})

    def stop(self, reason: str) -> None:
        """Leave without waiting: a joined room flushes its speakers and says
        bye; a room still joining (or with a jammed inbox) is cancelled."""
        self.closing = True
        if self.task is not None and not self._joined.done():
            self.closed_reason = reason
            self.task.cancel()
            # settled here too: a task cancelled before its first step runs no finally
            self._joined.set_exception(ports.HpbUnavailable("room closed before joining"))
            self._joined.exception()
            return
        try:
            self._inbox.put_nowait(Leave(reason))
        except asyncio.QueueFull:
            self.closed_reason = reason
            if self.task is not None:
                self.task.cancel()

    # --- the room's own task ----------------------------------------------------------------------
    async def run(self) -> None:
        """Join, caption, and leave. Returns when the room is done; every
        speaker and the link are closed by then."""
        try:
            async with self._link_factory(self.token) as link:
                self._link = link
                self.link_state = "connected"
                if not self._joined.done():
                    self._joined.set_result(None)
                async with asyncio.TaskGroup() as tasks:
                    pump = tasks.create_task(self._pump(link), name=f"room-pump-{self.token}")
                    translating = self._start_translations(tasks)
                    try:
                        await self._main(tasks)
                    finally:
                        pump.cancel()
                        if translating is not None:
                            translating.cancel()
                        if self._translations is not None:
                            self._translations.close()
                        if self._linger_task is not None:
                            self._linger_task.cancel()
                        for speaker in self._speakers.values():
                            speaker.close()
        except ports.HpbUnavailable as exc:
            self.closed_reason = self.closed_reason or "hpb-unavailable"
            if not self._joined.done():
                self._joined.set_exception(exc)
                # the Manager retrieves it; mark it retrieved for early exits too
                self._joined.exception()
            else:
                log.warning(
                    "room %s: HPB connection lost for good: %s",
                    _short(self.token),
                    exc,
                    extra=fields(self.token),
                )
        finally:
            self.closing = True
            # what nobody will read any more; speakers' end notices hold the
            # speakers, which hold this room (a cycle otherwise)
            while not self._inbox.empty():
                item = self._inbox.get_nowait()
                if isinstance(item, SetTranslation) and not item.reply.done():
                    item.reply.set_result("room-closed")
            # speakers that ended during shutdown never reached the main loop
            for _ in range(len(self._speakers) + len(self._reserved)):
                self._admission.release()
            self._speakers.clear()
            self._reserved.clear()
            self._unavailable.clear()
            self._wanted.clear()
            self._reading.clear()
            self._translations = None
            self._link = None
            self.link_state = "closed"
            self._on_link_event(self, ports.LinkState("closed"))
            if not self._joined.done():
                self._joined.set_exception(ports.HpbUnavailable("room closed before joining"))
                self._joined.exception()
            log.info(
                "room %s closed: %s",
                _short(self.token),
                self.closed_reason,
                extra=fields(self.token) | {"state": "closed"},
            )

    async def _pump(self, link: ports.CallLink) -> None:
        error: str | None = None
        try:
            async for event in link.events():
                await self._inbox.put(event)
        except Exception as exc:  # the link failed for good: the room ends
            error = repr(exc)
            log.warning("room %s: link failed: %s", _short(self.token), error, extra=fields(self.token))
        await self._inbox.put(_LinkClosed(error))

    async def _main(self, tasks: asyncio.TaskGroup) -> None:
        self._restart_linger(tasks)
        while True:
            item = await self._inbox.get()
            reason = self._handle(item, tasks)
            if reason is not None:
                self.closing = True
                self.closed_reason = reason
                return

    def _handle(self, item: _Item, tasks: asyncio.TaskGroup) -> str | None:
        """Apply one item; return a reason when the room must close."""
        match item:
            case AddTarget(talk_session):
                self._adds_in_flight -= 1
                added = talk_session not in self._targets
                self._targets.add(talk_session)
                self._restart_linger(tasks)
                if added:
                    self._record_changed()
            case RemoveTarget(talk_session):
                if self._targets.remove(talk_session):
                    self._record_changed()
                self._reading.pop(talk_session, None)
                self._restart_linger(tasks)
                self._delivery_settled()
            case SetTranslation(talk_session, language, reply):
                if not reply.done():
                    reply.set_result(self._set_translation(talk_session, language))
            case SetLanguage(language):
                if language != self.language:
                    log.info(
                        "room %s: language %s -> %s",
                        _short(self.token),
                        self.language,
                        language,
                        extra=fields(self.token),
                    )
                    self.language = language
                    for speaker in self._speakers.values():
                        speaker.set_language(language)
                    self._record_changed()
            case Leave(reason):
                return reason
            case _LingerExpired(generation):
                if generation == self._linger_generation and not self._targets and not self._adds_in_flight:
                    return "no-targets"
            case _LinkClosed(error):
                return "link-closed" if error is None else "link-failed"
            case _SpeakerEnded(session_id, speaker):
                if self._speakers.get(session_id) is speaker:
                    del self._speakers[session_id]
                    self._admission.release()
                    if session_id in self._wanted:
                        # it failed while still in the call: ask for a fresh offer
                        self._request_offer(session_id)
                self._offer_to_waiting()
            case ports.SessionMap(added, removed):
                if gone := self._targets.apply_mapping(added, removed):
                    for talk_session in gone:
                        self._reading.pop(talk_session, None)
                    self._restart_linger(tasks)
                    self._record_changed()
                self._delivery_settled()
            case ports.SpeakerJoined(session_id):
                self._wanted.add(session_id)
                self._unavailable.discard(session_id)
                if session_id not in self._speakers:
                    self._request_offer(session_id)
            case ports.SpeakerLeft(session_id):
                self._wanted.discard(session_id)
                self._unavailable.discard(session_id)
                if session_id in self._reserved:  # left before its offer came
                    self._reserved.discard(session_id)
                    self._admission.release()
                    self._offer_to_waiting()
                leaving = self._speakers.get(session_id)
                if leaving is not None:
                    leaving.close()
            case ports.OfferFailed(session_id, code):
                # the SFU has nothing from this speaker now: free its slot for others and
                # wait until the HPB reports it (re)joining, instead of asking in a loop
                if session_id in self._reserved:
                    self._reserved.discard(session_id)
                    self._admission.release()
                    self._unavailable.add(session_id)
                    log.info(
                        "room %s: no media from %s (%s)",
                        _short(self.token),
                        session_id,
                        code,
                        extra=fields(self.token, session_id),
                    )
                    self._offer_to_waiting()
            case ports.OfferReceived() as offer:
                self._start_speaker(offer, tasks)
            case ports.CandidateReceived() as candidate:
                receiver = self._speakers.get(candidate.speaker)
                if receiver is None:
                    self.stats.events_skipped += 1
                    log.debug(
                        "room %s: candidate for unknown speaker", _short(self.token), extra=fields(self.token)
                    )
                else:
                    receiver.add_candidate(candidate)
            case ports.SessionReset():
                self._targets.forget_mappings()
                for speaker in self._speakers.values():
                    speaker.close()
            case ports.CallEnded():
                return "call-ended"
            case ports.LinkState(state):
                self.link_state = state
                self._pending_with_captions_since = None  # counted from connected
                self._on_link_event(self, item)
            case ports.ReconnectFailed():
                self._on_link_event(self, item)
        return None

    def _record_changed(self) -> None:
        if self._on_record is not None:
            self._on_record(self)

    # --- speakers ---------------------------------------------------------------------------------
    def _request_offer(self, session_id: str) -> None:
        """Ask the SFU for a speaker's media, holding a caption slot for it
        until the offer arrives, so no offer is requested beyond the caps."""
        if self._link is None:
            return
        if session_id not in self._reserved:
            if self._refused(session_id):
                return
            self._reserved.add(session_id)
            self._admission.acquire()
        self._link.request_offer(session_id)

    @property
    def _load(self) -> int:
        return len(self._speakers) + len(self._reserved)

    def _refused(self, session_id: str) -> bool:
        """Admission: a refusal is counted, logged with its reason, and the
        speaker stays waiting (offered again when a slot frees up)."""
        refusal = self._admission.try_admit(self._load)
        if refusal is None:
            return False
        self.stats.speakers_refused += 1
        metrics.speakers_refused.labels(refusal.kind).inc()
        log.warning(
            "room %s: speaker %s not captioned: %s",
            _short(self.token),
            session_id,
            refusal.reason,
            extra=fields(self.token, session_id) | {"refusal": refusal.kind},
        )
        return True

    def _offer_to_waiting(self) -> None:
        for session_id in sorted(self.waiting_speakers):
            if self._admission.refusal(self._load) is not None:
                return
            self._request_offer(session_id)

    def _start_speaker(self, offer: ports.OfferReceived, tasks: asyncio.TaskGroup) -> None:
        if self._link is None:
            return
        if offer.speaker not in self._wanted:
            self.stats.events_skipped += 1
            log.info(
                "room %s: offer from %s, not a speaker: skipped",
                _short(self.token),
                offer.speaker,
                extra=fields(self.token, offer.speaker),
            )
            return
        old = self._speakers.pop(offer.speaker, None)
        if old is not None:  # a new offer replaces the old connection, in its slot
            old.close()
            if offer.speaker in self._reserved:
                self._reserved.discard(offer.speaker)
                self._admission.release()
        elif offer.speaker in self._reserved:  # the offer we asked for: its slot is held
            self._reserved.discard(offer.speaker)
        elif self._refused(offer.speaker):
            return
        else:
            self._admission.acquire()
        context = SpeakerContext(
            room_token=self.token,
            session_id=offer.speaker,
            offer=offer,
            language=self.language,
            link=self._link,
            publish=self._publish,
        )
        speaker = self._speaker_factory(context)
        self._speakers[offer.speaker] = speaker
        self.stats.speakers_started += 1
        tasks.create_task(self._run_speaker(offer.speaker, speaker), name=f"speaker-{offer.speaker}")

    async def _run_speaker(self, session_id: str, speaker: SpeakerSession) -> None:
        try:
            await speaker.run()
        except Exception:
            log.exception(
                "room %s: speaker %s failed",
                _short(self.token),
                session_id,
                extra=fields(self.token, session_id),
            )
        finally:
            # put_nowait: at room shutdown nobody reads the inbox any more and
            # the speaker list is dropped with the room anyway
            try:
                self._inbox.put_nowait(_SpeakerEnded(session_id, speaker))
            except asyncio.QueueFull:
                log.warning(
                    "room %s: inbox full at speaker end", _short(self.token), extra=fields(self.token)
                )
                if self._speakers.get(session_id) is speaker:
                    del self._speakers[session_id]
                    self._admission.release()

    def _publish(self, speaker: str, text: str, final: bool) -> None:
        link = self._link
        resolved = self._targets.resolved_by_talk()
        self._watch_delivery()
        # a target reading a translation no longer gets the originals
        targets = [
            hpb for talk, hpb in resolved.items() if self._reading.get(talk, self.language) == self.language
        ]
        translated = {
            lang for talk, lang in self._reading.items() if talk in resolved and lang != self.language
        }
        if final and translated and self._translations is not None:
            self._translations.on_final(speaker, text, self.language, translated)
        if link is None or not targets:
            if not translated:
                self.stats.captions_without_target += 1
                metrics.captions_dropped.labels("no-target").inc()
            return
        link.send_transcript(targets, speaker, text, final, self.language)
        self.stats.captions_sent += 1

    def _delivery_settled(self) -> None:
        """Every target resolved (or gone): a stall, if any, is over."""
        if self._targets.pending:
            return
        if self._stall_reported:
            log.info("room %s: caption delivery resumed", _short(self.token), extra=fields(self.token))
        self._pending_with_captions_since = None
        self._stall_reported = False

    def _watch_delivery(self) -> None:
        """Called with every caption: notice (once per episode) a target that
        stays pending while captions are there for it."""
        if not self._targets.pending or self.link_state != "connected":
            self._delivery_settled()
            return
        if self._pending_with_captions_since is None:
            self._pending_with_captions_since = self._clock.now()
        elif self.delivery_stalled and not self._stall_reported:
            self._stall_reported = True
            metrics.delivery_stalls.inc()
            log.warning(
                "room %s: captions are produced but %d target(s) have had no HPB session for over %.0f s",
                _short(self.token),
                len(self._targets.pending),
                DELIVERY_STALL_SECONDS,
                extra=fields(self.token),
            )

    # --- translation --------------------------------------------------------------------------------
    def _start_translations(self, tasks: asyncio.TaskGroup) -> asyncio.Task[None] | None:
        if self._translation is None:
            return None
        self._translations = RoomTranslations(
            self.token,
            self._translation.translator,
            self._deliver_translation,
            clock=self._clock,
            timeout=self._translation.timeout,
            max_jobs=self._translation.max_jobs,
        )
        return tasks.create_task(self._translations.run(), name=f"room-translations-{self.token}")

    def _set_translation(self, talk_session: str, language: str | None) -> str:
        if talk_session not in self._targets:
            return "not-a-target"
        if language is None:
            self._reading.pop(talk_session, None)
            return "ok"
        if language == self.language:
            return "same-language"
        self._reading[talk_session] = language
        return "ok"

    def _deliver_translation(self, speaker: str, language: str, text: str) -> int:
        """Send a translated final to the targets reading ``language`` now
        (a target that switched back to the originals gets nothing more)."""
        link = self._link
        if link is None or language == self.language:
            return 0
        readers = [
            hpb
            for talk, hpb in self._targets.resolved_by_talk().items()
            if self._reading.get(talk) == language
        ]
        if readers:
            link.send_transcript(readers, speaker, text, True, language)
        return len(readers)

    # --- lingering --------------------------------------------------------------------------------
    def _restart_linger(self, tasks: asyncio.TaskGroup) -> None:
        """Start the linger countdown when the last target is gone; stop it
        when a target arrives."""
        if self._targets:
            if self._linger_task is not None:
                self._linger_task.cancel()
                self._linger_task = None
        elif self._linger_task is None or self._linger_task.done():
            self._linger_generation += 1
            self._linger_task = tasks.create_task(self._linger(self._linger_generation))

    async def _linger(self, generation: int) -> None:
        await self._clock.sleep(self._linger_seconds)
        await self._inbox.put(_LingerExpired(generation))


_short = short_token
