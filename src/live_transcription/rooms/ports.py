"""What a Room needs from the call's signaling connection (the HPB link).

``hpb.connection`` implements ``CallLink``; tests use an in-memory fake. The
room only sees these events and calls, never WebSocket frames.

All session ids here are **HPB session ids**, except ``SessionMap`` whose
keys are Nextcloud Talk session ids (what Talk sends as ``ncSessionId``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Collection, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Literal, Protocol

from live_transcription.hpb.failures import FailureCause


@dataclass(frozen=True, slots=True)
class SpeakerJoined:
    """A participant is in the call with audio: subscribe to them."""

    session_id: str


@dataclass(frozen=True, slots=True)
class SpeakerLeft:
    """A participant left the call or stopped publishing audio."""

    session_id: str


@dataclass(frozen=True, slots=True)
class SessionMap:
    """Talk session id -> HPB session id for participants of the room. ``added``
    are new or changed mappings, ``removed`` are Talk session ids gone."""

    added: Mapping[str, str] = field(default_factory=dict)
    removed: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class OfferReceived:
    """The SFU offers a speaker's media (answer with ``send_answer``)."""

    speaker: str
    sid: str
    sdp: str


@dataclass(frozen=True, slots=True)
class CandidateReceived:
    """A trickled ICE candidate for a speaker's connection. ``candidate`` is the
    ``candidate:...`` line without ``a=``; empty means end of candidates."""

    speaker: str
    sid: str | None
    candidate: str
    sdp_mid: str | None
    sdp_mline_index: int | None


@dataclass(frozen=True, slots=True)
class OfferFailed:
    """The HPB refused a ``requestoffer`` (e.g. ``client_not_found``: the
    speaker publishes nothing right now)."""

    speaker: str
    code: str


@dataclass(frozen=True, slots=True)
class CallEnded:
    """The call ended for everybody (``all`` with ``incall: 0``)."""


@dataclass(frozen=True, slots=True)
class SessionReset:
    """Our HPB session was replaced (full reconnect after ``no_such_session``).
    Every media subscription of the old session is gone: close the speakers'
    peer connections; fresh offers follow for the current speakers."""


@dataclass(frozen=True, slots=True)
class LinkState:
    """The link's connection state changed (for health and logs)."""

    state: Literal["connected", "reconnecting", "closed"]


@dataclass(frozen=True, slots=True)
class ReconnectFailed:
    """An attempt to reconnect the link failed (the link tries again after a
    backoff). ``began``: when the attempt began, on the process's monotonic
    clock."""

    cause: FailureCause
    began: float


CallEvent = (
    SpeakerJoined
    | SpeakerLeft
    | SessionMap
    | OfferReceived
    | CandidateReceived
    | OfferFailed
    | CallEnded
    | SessionReset
    | LinkState
    | ReconnectFailed
)


@dataclass(frozen=True, slots=True)
class LocalCandidate:
    """An ICE candidate of ours to trickle to the SFU; ``candidate`` empty =
    end of candidates."""

    candidate: str
    sdp_mid: str | None
    sdp_mline_index: int | None


class HpbUnavailable(Exception):
    """The HPB could not be reached or refused us (Talk gets 503)."""


class CallLink(Protocol):
    """One room's signaling connection, joined to the room when entered.

    Sends never block the caller: they go through the link's bounded outgoing
    queue. Control messages are never dropped silently; transcripts are
    dropped oldest-first (counted) when the HPB is gone longer than the queue
    holds, and partials are throttled per speaker (newest wins)."""

    def events(self) -> AsyncIterator[CallEvent]:
        """Participant, media and state events, in order, until the link closes."""
        ...

    def request_offer(self, speaker: str) -> None: ...

    def send_answer(self, speaker: str, sid: str, sdp: str) -> None: ...

    def send_candidate(self, speaker: str, sid: str, candidate: LocalCandidate) -> None: ...

    def send_transcript(
        self, targets: Collection[str], speaker: str, text: str, final: bool, language: str
    ) -> None: ...

    @property
    def session_id(self) -> str | None:
        """Our current HPB session id (None while not connected)."""
        ...


CallLinkFactory = Callable[[str], AbstractAsyncContextManager[CallLink]]
"""``factory(room_token)``: entering connects, says hello, sets in-call and
joins the room (raising ``HpbUnavailable`` when it cannot); leaving sends
``bye`` and closes. Reconnection and resume happen inside."""
