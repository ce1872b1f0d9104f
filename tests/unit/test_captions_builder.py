from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from live_transcription.captions.builder import Caption, CaptionBuilder
from live_transcription.stt.base import Pause, StreamError, SttEvent, Word


def run(events: list[tuple[SttEvent, float]], **options: float) -> list[Caption]:
    builder = CaptionBuilder(**options)  # type: ignore[arg-type]
    out: list[Caption] = []
    for event, now in events:
        out += builder.feed(event, now)
    return out + builder.flush()


def test_partials_grow_and_a_pause_finalises() -> None:
    out = run([(Word("Hello"), 0.0), (Word("world."), 0.5), (Pause(), 1.0)])
    assert out == [Caption("Hello", False), Caption("Hello world.", False), Caption("Hello world.", True)]


def test_spacing_for_pieces_and_punctuation() -> None:
    events: list[tuple[SttEvent, float]] = [
        (Word(" Hel"), 0.0),
        (Word("lo", joins_previous=True), 0.1),
        (Word(","), 0.2),
        (Word("  world "), 0.3),
        (Word("!"), 0.4),
        (Pause(), 0.5),
    ]
    assert run(events)[-1] == Caption("Hello, world!", True)


def test_language_separator() -> None:
    out = run([(Word("你好"), 0.0), (Word("世界"), 0.1)], separator="")  # type: ignore[arg-type]
    assert out[-1] == Caption("你好世界", True)


def test_no_empty_final_and_no_repeated_partial() -> None:
    assert run([(Pause(), 0.0), (Pause(), 1.0)]) == []
    out = run([(Word("a"), 0.0), (Word(" "), 0.1), (StreamError("x"), 0.2)])
    assert out == [Caption("a", False), Caption("a", True)]


def test_long_line_is_cut_at_the_last_sentence_end() -> None:
    events: list[tuple[SttEvent, float]] = [
        (Word("One"), 0.0),
        (Word("two."), 1.0),
        (Word("Three"), 2.0),
        (Word("four"), 10.5),
    ]
    out = run(events, max_seconds=10.0)
    assert Caption("One two.", True) in out
    assert out[-1] == Caption("Three four", True)
    finals = [c.text for c in out if c.final]
    assert finals == ["One two.", "Three four"]


def test_long_line_without_sentence_end_is_cut_whole() -> None:
    events: list[tuple[SttEvent, float]] = [(Word(f"w{i}"), float(i)) for i in range(13)]
    finals = [c.text for c in run(events, max_seconds=5.0) if c.final]
    assert finals[0] == "w0 w1 w2 w3 w4 w5"
    assert " ".join(finals).split() == [f"w{i}" for i in range(13)]


def test_max_chars() -> None:
    events: list[tuple[SttEvent, float]] = [(Word("abcdefghij"), 0.0) for _ in range(5)]
    finals = [c.text for c in run(events, max_chars=25) if c.final]
    assert all(len(text) <= 32 for text in finals)
    assert " ".join(finals).count("abcdefghij") == 5


words = st.text(
    alphabet=st.characters(whitelist_categories=("Ll", "Lu", "Nd"), max_codepoint=0x2FF),
    min_size=1,
    max_size=8,
)


@given(
    st.lists(
        st.one_of(
            st.tuples(words, st.sampled_from(["", ".", ",", "?"])).map(lambda t: Word(t[0] + t[1])),
            st.just(Pause()),
        ),
        max_size=80,
    ),
    st.floats(min_value=0.5, max_value=20),
    st.integers(min_value=5, max_value=120),
)
def test_finals_carry_every_word_once_in_order(
    events: list[Word | Pause], max_seconds: float, max_chars: int
) -> None:
    timed: list[tuple[SttEvent, float]] = [(event, i * 0.3) for i, event in enumerate(events)]
    out = run(timed, max_seconds=max_seconds, max_chars=max_chars)
    finals = [c.text for c in out if c.final]
    assert all(text and text == text.strip() for text in finals)
    expected = [e.text for e in events if isinstance(e, Word)]
    assert " ".join(finals).split() == expected
    for caption in out:
        assert caption.text == caption.text.strip()
