"""Who receives a room's captions: pure bookkeeping, no I/O.

Talk names a target by its Talk session id (``ncSessionId``); captions go to
HPB session ids. The mapping arrives with participant updates, possibly after
the request, so a target without a mapping waits as *pending*.

A Talk session id belongs to one join of the room: when that session leaves
the room, the target is gone too (a rejoin comes with a new id and a new
request from Talk).
"""

from __future__ import annotations

from collections.abc import Mapping


class TargetBook:
    __slots__ = ("_hpb_by_talk", "_targets")

    def __init__(self) -> None:
        self._targets: set[str] = set()
        self._hpb_by_talk: dict[str, str] = {}

    # --- requests from Talk -------------------------------------------------------
    def add(self, talk_session: str) -> None:
        self._targets.add(talk_session)

    def remove(self, talk_session: str) -> bool:
        """Remove a target; False when it was not one."""
        if talk_session in self._targets:
            self._targets.remove(talk_session)
            return True
        return False

    # --- participant updates from the HPB ----------------------------------------------
    def apply_mapping(self, added: Mapping[str, str], removed: frozenset[str]) -> set[str]:
        """Record Talk -> HPB session ids; returns the targets that left the
        room with their session (they stop being targets)."""
        self._hpb_by_talk.update(added)
        gone: set[str] = set()
        for talk_session in removed:
            self._hpb_by_talk.pop(talk_session, None)
            if talk_session in self._targets:
                self._targets.remove(talk_session)
                gone.add(talk_session)
        return gone

    def forget_mappings(self) -> None:
        """Our HPB session was replaced: every mapping arrives again."""
        self._hpb_by_talk.clear()

    # --- queries ---------------------------------------------------------------------
    def resolved(self) -> list[str]:
        """HPB session ids of the targets whose mapping is known."""
        return [self._hpb_by_talk[talk] for talk in sorted(self._targets) if talk in self._hpb_by_talk]

    def resolved_by_talk(self) -> dict[str, str]:
        """Talk session id -> HPB session id, for the targets whose mapping is known."""
        return {talk: self._hpb_by_talk[talk] for talk in sorted(self._targets) if talk in self._hpb_by_talk}

    def talk_sessions(self) -> frozenset[str]:
        """Every target, by Talk session id (resolved or pending)."""
        return frozenset(self._targets)

    @property
    def pending(self) -> set[str]:
        return {talk for talk in self._targets if talk not in self._hpb_by_talk}

    def __len__(self) -> int:
        return len(self._targets)

    def __contains__(self, talk_session: object) -> bool:
        return talk_session in self._targets
