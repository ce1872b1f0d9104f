from hypothesis import given
from hypothesis import strategies as st

from live_transcription.hpb.participants import ParticipantsState, is_speaker
from live_transcription.hpb.protocol import Participant, ParticipantsUpdate
from live_transcription.rooms.ports import (
    CallEnded,
    CallEvent,
    SessionMap,
    SpeakerJoined,
    SpeakerLeft,
)


def person(sid: str, in_call: int, nc: str | None = None, **flags: bool) -> Participant:
    return Participant(
        sid, nc or f"nc-{sid}", in_call, None, flags.get("internal", False), flags.get("virtual", False)
    )


def full(*users: Participant) -> ParticipantsUpdate:
    return ParticipantsUpdate("room", tuple(users), None, None, False)


def changed(*users: Participant) -> ParticipantsUpdate:
    return ParticipantsUpdate("room", None, tuple(users), None, False)


def test_speakers_mapping_and_skips() -> None:
    state = ParticipantsState(own_session_id="me")
    events = state.apply(
        full(
            person("a", 3),
            person("b", 1),
            person("c", 7),
            person("bot", 3, internal=True),
            person("phone", 3, virtual=True),
            person("me", 3),
        )
    )
    assert events == [
        SessionMap(added={"nc-a": "a", "nc-b": "b", "nc-c": "c"}),
        SpeakerJoined("a"),
        SpeakerJoined("c"),
    ]
    assert state.apply(full(person("a", 3), person("b", 1), person("c", 7))) == []
    # a mutes (drops audio), b starts speaking
    assert state.apply(changed(person("a", 1), person("b", 3))) == [
        SpeakerLeft("a"),
        SpeakerJoined("b"),
    ]
    assert state.apply(changed(person("c", 0))) == [SpeakerLeft("c")]
    assert state.leave(["b", "unknown"]) == [
        SpeakerLeft("b"),
        SessionMap(removed=frozenset({"nc-b"})),
    ]
    assert state.leave(["b"]) == []
    assert state.speakers == frozenset()
    assert state.session_map == {"nc-a": "a", "nc-c": "c"}


def test_full_list_removes_missing_and_all_zero_ends_call() -> None:
    state = ParticipantsState()
    state.apply(full(person("a", 3), person("b", 3)))
    assert state.apply(full(person("a", 3))) == [
        SpeakerLeft("b"),
        SessionMap(removed=frozenset({"nc-b"})),
    ]
    end = ParticipantsUpdate("room", None, None, 0, True)
    assert state.apply(end) == [SpeakerLeft("a"), CallEnded()]
    assert state.apply(end) == []
    assert state.apply(changed(person("a", 3))) == [SpeakerJoined("a")]
    assert state.apply(end) == [SpeakerLeft("a"), CallEnded()]


def test_changed_mapping_is_a_delta() -> None:
    state = ParticipantsState()
    state.apply(full(person("a", 1, nc="x")))
    assert state.apply(full(person("b", 1, nc="x"))) == [SessionMap(added={"x": "b"})]


updates = st.lists(
    st.tuples(
        st.sampled_from(["full", "changed", "leave", "all"]),
        st.lists(
            st.builds(
                person,
                st.sampled_from(["a", "b", "c", "d"]),
                st.integers(0, 15),
                st.sampled_from(["n1", "n2", "n3"]),
                internal=st.booleans(),
            ),
            max_size=4,
        ),
        st.integers(0, 7),
    ),
    max_size=12,
)


@given(updates)
def test_events_track_state_and_repeat_is_silent(steps: list[tuple[str, list[Participant], int]]) -> None:
    state = ParticipantsState()
    speakers: set[str] = set()
    mapping: dict[str, str] = {}
    for kind, people, flags in steps:
        for _ in range(2):
            if kind == "full":
                events: list[CallEvent] = state.apply(full(*people))
            elif kind == "changed":
                events = state.apply(changed(*people))
            elif kind == "all":
                events = state.apply(ParticipantsUpdate("room", None, None, flags, True))
            else:
                events = state.leave(p.session_id for p in people)
            for event in events:
                if isinstance(event, SpeakerJoined):
                    assert event.session_id not in speakers
                    speakers.add(event.session_id)
                elif isinstance(event, SpeakerLeft):
                    speakers.remove(event.session_id)
                elif isinstance(event, SessionMap):
                    for nc in event.removed:
                        del mapping[nc]
                    mapping.update(event.added)
            if _ == 1:
                assert events == []
        assert speakers == state.speakers
        assert mapping == state.session_map
        assert all(is_speaker(3 | extra) for extra in (0, 4, 8))


def test_reset_forgets_everything_so_the_same_list_is_news_again() -> None:
    state = ParticipantsState(own_session_id="me")
    listing = full(person("a", 3), person("b", 1))
    state.apply(listing)
    assert state.has("a") and state.has("b")
    assert state.reset("me-too") == [SpeakerLeft("a")]
    assert state.own_session_id == "me-too"
    assert not state.has("a") and state.session_map == {} and state.speakers == frozenset()
    assert state.apply(listing) == [SessionMap(added={"nc-a": "a", "nc-b": "b"}), SpeakerJoined("a")]


def test_a_talk_session_that_reconnected_maps_to_its_newest_hpb_session() -> None:
    state = ParticipantsState()
    state.apply(full(person("z-old", 1, nc="talk-v")))
    # the browser's new session appears while the old one lingers, either order in the list
    assert state.apply(full(person("z-old", 1, nc="talk-v"), person("a-new", 1, nc="talk-v"))) == [
        SessionMap(added={"talk-v": "a-new"})
    ]
    assert state.apply(full(person("a-new", 1, nc="talk-v"), person("z-old", 1, nc="talk-v"))) == []
    # the old one leaves: nothing changes for the Talk session
    assert state.leave(["z-old"]) == []
    assert state.session_map == {"talk-v": "a-new"}
