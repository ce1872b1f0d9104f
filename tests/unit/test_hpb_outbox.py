import itertools
import random

from hypothesis import given
from hypothesis import strategies as st

from live_transcription.hpb.outbox import Message, Outbox, backoff_delay


def build(target: str, speaker: str, text: str, final: bool, language: str) -> Message:
    return {"to": target, "speaker": speaker, "text": text, "final": final, "lang": language}


def drain(box: Outbox) -> list[Message]:
    out = []
    while (msg := box.peek()) is not None:
        out.append(msg)
        box.sent(msg)
    return out


def test_partials_throttled_newest_wins_final_immediate() -> None:
    box = Outbox(build, partial_interval=0.3)
    box.add_transcript(["t1", "t2"], "s", "he", False, "en", now=0.0)
    assert [m["to"] for m in drain(box)] == ["t1", "t2"]
    box.add_transcript(["t1"], "s", "hel", False, "en", now=0.1)
    box.add_transcript(["t1"], "s", "hell", False, "en", now=0.2)
    assert drain(box) == []
    assert box.next_due() == 0.3
    box.release_due(0.29)
    assert drain(box) == []
    box.release_due(0.3)
    assert [m["text"] for m in drain(box)] == ["hell"]
    box.add_transcript(["t1"], "s", "hello w", False, "en", now=0.4)
    box.add_transcript(["t1"], "s", "hello world", True, "en", now=0.41)
    box.release_due(10.0)
    assert [(m["text"], m["final"]) for m in drain(box)] == [("hello world", True)]
    assert box.next_due() is None


def test_control_first_bounded_and_transcripts_drop_oldest() -> None:
    box = Outbox(build, control_limit=2, transcript_limit=3)
    for i in range(5):
        box.add_transcript(["t"], f"s{i}", str(i), True, "en", now=0.0)
    assert box.add_control({"c": 1}) and box.add_control({"c": 2})
    assert not box.add_control({"c": 3})
    assert box.control_refused == 1
    assert box.transcripts_dropped == 2
    assert [m.get("c", m.get("text")) for m in drain(box)] == [1, 2, "2", "3", "4"]


@given(st.lists(st.tuples(st.floats(0, 0.5), st.booleans(), st.sampled_from("ab")), max_size=60))
def test_at_most_one_partial_per_interval_per_speaker(steps: list[tuple[float, bool, str]]) -> None:
    box = Outbox(build, partial_interval=0.3)
    now = 0.0
    sent: dict[str, list[float]] = {"a": [], "b": []}
    last_text: dict[str, str] = {}
    for i, (dt, final, speaker) in enumerate(steps):
        now += dt
        box.release_due(now)
        box.add_transcript(["t"], speaker, str(i), final, "en", now=now)
        last_text[speaker] = str(i)
        for msg in drain(box):
            if not msg["final"]:
                sent[msg["speaker"]].append(now)
    for times in sent.values():
        assert all(b - a >= 0.3 - 1e-9 for a, b in itertools.pairwise(times))
    box.release_due(now + 1)
    for msg in drain(box):
        assert msg["text"] == last_text[msg["speaker"]]


def test_backoff_grows_capped_with_jitter_bounds() -> None:
    rng = random.Random(7)
    for attempt in range(12):
        ceiling = min(30.0, 0.5 * 2**attempt)
        delay = backoff_delay(attempt, rng)
        assert ceiling * 0.5 <= delay <= ceiling
    assert backoff_delay(10_000, rng) <= 30.0
