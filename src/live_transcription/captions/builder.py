"""Words and pauses -> caption lines for one speaker (pure, no I/O).

Talk shows a speaker's non-final caption as the whole utterance so far and
replaces it with each update; a final freezes it. So the builder keeps one
open line per speaker:

- each word grows the line and yields a partial carrying the whole line;
- a pause yields the line as final (a final is never empty);
- a line longer than ``max_seconds`` or ``max_chars`` is finalised: at the
  last sentence end inside it when there is one (the rest opens the next
  line), otherwise whole;
- spaces are the language's separator between words, none before a piece
  that continues a word (``Word.joins_previous``) or before closing
  punctuation; no leading or trailing spaces.

Partial throttling is the HPB link's job; the builder only avoids emitting a
partial identical to the previous one.
"""

from __future__ import annotations

from dataclasses import dataclass

from live_transcription.stt.base import Pause, SttEvent, Word

# full-width marks spelled as escapes: CJK sentence ends and closing punctuation
SENTENCE_END = (".", "?", "!", "\u2026", "\u3002", "\uff1f", "\uff01")
_CLOSING = frozenset(".,;:!?)]}%\u2026\u00bb\u201d\u2019\u3002\uff0c\u3001\uff1f\uff01")


@dataclass(frozen=True, slots=True)
class Caption:
    text: str
    final: bool


class CaptionBuilder:
    __slots__ = (
        "_last_partial",
        "_max_chars",
        "_max_seconds",
        "_separator",
        "_started_at",
        "_text",
        "_word_ends",
    )

    def __init__(self, *, separator: str = " ", max_seconds: float = 10.0, max_chars: int = 250) -> None:
        self._separator = separator
        self._max_seconds = max_seconds
        self._max_chars = max_chars
        self._text = ""
        self._word_ends: list[int] = []  # offsets in _text where a sentence ends
        self._started_at: float | None = None
        self._last_partial = ""

    @property
    def open_line(self) -> str:
        return self._text

    def feed(self, event: SttEvent, now: float) -> list[Caption]:
        if isinstance(event, Word):
            return self._word(event, now)
        if isinstance(event, Pause):
            return self.flush()
        return []

    def flush(self) -> list[Caption]:
        """Finalise the open line, if any."""
        if not self._text:
            return []
        final = Caption(self._text, True)
        self._reset()
        return [final]

    # --- internals ------------------------------------------------------------------------
    def _word(self, word: Word, now: float) -> list[Caption]:
        piece = word.text.strip()
        if not piece:
            return []
        if not self._text:
            self._started_at = now
            self._text = piece
        elif word.joins_previous or piece[0] in _CLOSING:
            self._text += piece
        else:
            self._text += self._separator + piece
        if piece.endswith(SENTENCE_END):
            self._word_ends.append(len(self._text))
        assert self._started_at is not None
        too_long = len(self._text) > self._max_chars or now - self._started_at >= self._max_seconds
        if too_long:
            return self._split(now)
        if self._text == self._last_partial:
            return []
        self._last_partial = self._text
        return [Caption(self._text, False)]

    def _split(self, now: float) -> list[Caption]:
        """Finalise at the last sentence end before the line's end, or whole."""
        cut = next((end for end in reversed(self._word_ends) if end < len(self._text)), None)
        if cut is None:
            return self.flush()
        head, rest = self._text[:cut].strip(), self._text[cut:].strip()
        captions = [Caption(head, True)]
        self._reset()
        if rest:
            self._text = rest
            self._started_at = now
            self._last_partial = rest
            captions.append(Caption(rest, False))
        return captions

    def _reset(self) -> None:
        self._text = ""
        self._word_ends.clear()
        self._started_at = None
        self._last_partial = ""
