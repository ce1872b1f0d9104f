"""Who is in the room's call, from the HPB's participant updates. Pure.

Turns ``ParticipantsUpdate`` and room ``leave`` events into the room's
events: ``SpeakerJoined``/``SpeakerLeft`` (in the call with audio or not),
``SessionMap`` deltas (Talk session id -> HPB session id) and ``CallEnded``.
Applying the same input twice emits nothing the second time.

What it knows belongs to one HPB session of ours: when the HPB replaces that
session, ``reset`` forgets everything, so the participant list that follows
the new join is news again and rebuilds speakers and mapping in full.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from live_transcription.hpb.protocol import IN_CALL, WITH_AUDIO, Participant, ParticipantsUpdate
from live_transcription.rooms.ports import (
    CallEnded,
    CallEvent,
    SessionMap,
    SpeakerJoined,
    SpeakerLeft,
)

SPEAKING = IN_CALL | WITH_AUDIO


def is_speaker(in_call: int) -> bool:
    return in_call & SPEAKING == SPEAKING


@dataclass(frozen=True, slots=True)
class _Entry:
    nextcloud_session_id: str | None
    in_call: int


class ParticipantsState:
    """The room's participants as the HPB reports them; one owner (the link)."""

    def __init__(self, own_session_id: str | None = None) -> None:
        self.own_session_id = own_session_id
        self._entries: dict[str, _Entry] = {}
        self._speakers: set[str] = set()
        self._mapping: dict[str, str] = {}  # Talk session id -> HPB session id
        self._call_ended = False

    @property
    def speakers(self) -> frozenset[str]:
        return frozenset(self._speakers)

    @property
    def session_map(self) -> dict[str, str]:
        return dict(self._mapping)

    def has(self, session_id: str) -> bool:
        """Whether the HPB last reported ``session_id`` in the room."""
        return session_id in self._entries

    def reset(self, own_session_id: str | None) -> list[CallEvent]:
        """Our HPB session was replaced: nothing reported to the old one holds.
        Returns ``SpeakerLeft`` for every speaker (their media was subscribed
        by the old session); the mapping is dropped without removal events
        because targets outlive our session (the caller says ``SessionReset``)."""
        events: list[CallEvent] = [SpeakerLeft(sid) for sid in sorted(self._speakers)]
        self.own_session_id = own_session_id
        self._entries = {}
        self._speakers = set()
        self._mapping = {}
        self._call_ended = False
        return events

    def _relevant(self, participant: Participant) -> bool:
        return not (
            participant.internal or participant.virtual or participant.session_id == self.own_session_id
        )

    def apply(self, update: ParticipantsUpdate) -> list[CallEvent]:
        entries = dict(self._entries)
        if update.users is not None:
            # ``users`` is the full list: whoever is missing is gone
            entries = {
                p.session_id: _Entry(p.nextcloud_session_id, p.in_call)
                for p in update.users
                if self._relevant(p)
            }
        for p in update.changed or ():
            if self._relevant(p):
                entries[p.session_id] = _Entry(p.nextcloud_session_id, p.in_call)
        if update.all and update.in_call is not None:
            flags = update.in_call
            entries = {sid: _Entry(e.nextcloud_session_id, flags) for sid, e in entries.items()}
        events = self._replace(entries)
        if update.all and update.in_call == 0:
            if not self._call_ended:
                events.append(CallEnded())
            self._call_ended = True
        elif any(e.in_call for e in entries.values()):
            self._call_ended = False
        return events

    def leave(self, session_ids: Iterable[str]) -> list[CallEvent]:
        gone = set(session_ids)
        return self._replace({sid: e for sid, e in self._entries.items() if sid not in gone})

    def _map_talk_sessions(self, entries: dict[str, _Entry]) -> dict[str, str]:
        """Talk session id -> HPB session id. A Talk session with two HPB
        sessions is a browser that reconnected while its old session lingers:
        the one that appeared last is the one listening."""
        mapping: dict[str, str] = {}
        for sid, entry in entries.items():
            talk = entry.nextcloud_session_id
            if not talk:
                continue
            chosen = mapping.get(talk)
            if chosen is None or self._rank(sid, talk) > self._rank(chosen, talk):
                mapping[talk] = sid
        return mapping

    def _rank(self, sid: str, talk: str) -> int:
        if sid not in self._entries:
            return 2  # arrived with this update
        return 1 if self._mapping.get(talk) == sid else 0

    def _replace(self, entries: dict[str, _Entry]) -> list[CallEvent]:
        """Switch to ``entries`` and return what changed, in a stable order:
        speakers that left, the mapping delta, speakers that joined."""
        speakers = {sid for sid, e in entries.items() if is_speaker(e.in_call)}
        mapping = self._map_talk_sessions(entries)
        events: list[CallEvent] = [SpeakerLeft(sid) for sid in sorted(self._speakers - speakers)]
        added = {nc: sid for nc, sid in mapping.items() if self._mapping.get(nc) != sid}
        removed = frozenset(self._mapping.keys() - mapping.keys())
        if added or removed:
            events.append(SessionMap(added=added, removed=removed))
        events.extend(SpeakerJoined(sid) for sid in sorted(speakers - self._speakers))
        self._entries = entries
        self._speakers = speakers
        self._mapping = mapping
        return events
