from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from live_transcription.audio.opus import OpusEncoder
from live_transcription.audio.pipeline import GateConfig, SpeakerAudio
from live_transcription.media.packet import OpusRtp
from live_transcription.stt.base import FRAME_SAMPLES
from tests.unit.test_audio_opus import best_correlation, chirp

LOUD = 20
QUIET = 127
LEAD_IN = 12 * 480  # the default 240 ms pre-roll: silence before the first word at 24 kHz


class Sink:
    def __init__(self, config: GateConfig | None = None) -> None:
        self.frames: list[npt.NDArray[np.float32]] = []
        self.events: list[str] = []
        self.audio = SpeakerAudio(on_frame=self._frame, on_speech_end=self._end, config=config, label="test")

    def _frame(self, frame: npt.NDArray[np.float32]) -> None:
        self.frames.append(frame)
        self.events.append("frame")

    def _end(self) -> None:
        self.events.append("end")

    @property
    def samples(self) -> npt.NDArray[np.float32]:
        if not self.frames:
            return np.zeros(0, dtype=np.float32)
        return np.concatenate(self.frames)


class Stream:
    """Builds RTP packets of 20 ms: encoded audio, sequence and timestamps."""

    def __init__(self, seq: int = 1000, ts: int = 5000, ssrc: int = 7) -> None:
        self.encoder = OpusEncoder(48_000, 1)
        self.seq = seq
        self.ts = ts
        self.ssrc = ssrc
        self.time = 0.0

    def packets(
        self, signal: npt.NDArray[np.float32], level: int | None, ts_step: int = 960
    ) -> list[OpusRtp]:
        out = []
        for i in range(0, signal.size - 959, 960):
            payload = self.encoder.encode(signal[i : i + 960])
            out.append(
                OpusRtp(
                    payload,
                    self.seq % 65536,
                    self.ts % (1 << 32),
                    audio_level=level,
                    arrival_time=self.time,
                    ssrc=self.ssrc,
                )
            )
            self.seq += 1
            self.ts += ts_step
            self.time += 0.02
        return out


def silence(seconds: float) -> npt.NDArray[np.float32]:
    return np.zeros(round(48_000 * seconds), dtype=np.float32)


def feed(sink: Sink, packets: list[OpusRtp]) -> None:
    for packet in packets:
        sink.audio.feed(packet)


def test_voiced_packets_become_80ms_frames_matching_the_source() -> None:
    sink = Sink()
    feed(sink, Stream().packets(chirp(48_000, 1.0), LOUD))
    assert all(f.shape == (FRAME_SAMPLES,) and f.dtype == np.float32 for f in sink.frames)
    # speech from the first packet still gets a pre-roll, of silence
    assert sink.audio.frames_out == len(sink.frames) == (LEAD_IN + 50 * 480) // FRAME_SAMPLES
    assert not sink.samples[:LEAD_IN].any()
    assert best_correlation(chirp(24_000, 1.0), sink.samples[LEAD_IN:]) > 0.9
    assert sink.audio.packets_decoded == 50
    assert sink.audio.packets_silent == 0
    # each frame is its own buffer: the consumer may keep it
    assert len({id(f) for f in sink.frames}) == len(sink.frames)
    assert not np.shares_memory(sink.frames[0], sink.frames[1])


def test_silent_packets_by_audio_level_are_not_decoded() -> None:
    sink = Sink()
    feed(sink, Stream().packets(chirp(48_000, 1.0), QUIET))
    assert sink.audio.packets_in == 50
    assert sink.audio.packets_silent == 50
    assert sink.audio.packets_decoded == 0
    assert sink.frames == []
    assert sink.events == []


def test_level_threshold_is_configurable() -> None:
    sink = Sink(GateConfig(silence_level_dbov=30))
    feed(sink, Stream().packets(chirp(48_000, 0.4), 40))
    assert sink.audio.packets_decoded == 0
    sink = Sink(GateConfig(silence_level_dbov=45))
    feed(sink, Stream().packets(chirp(48_000, 0.4), 40))
    assert sink.audio.packets_decoded == 20


@pytest.mark.parametrize("preroll_ms", [0, 240])
def test_preroll_delivers_audio_from_before_speech_start(preroll_ms: int) -> None:
    sink = Sink(GateConfig(preroll_ms=preroll_ms))
    stream = Stream()
    source = chirp(48_000, 1.0)
    # the first 400 ms are marked quiet (say, a soft first syllable), then loud
    feed(sink, stream.packets(source[: 48_000 * 2 // 5], QUIET))
    feed(sink, stream.packets(source[48_000 * 2 // 5 :], LOUD))
    held = preroll_ms // 20
    assert sink.audio.packets_decoded == 30 + held
    emitted = sink.audio.frames_out * FRAME_SAMPLES
    assert emitted == ((30 + held) * 480 // FRAME_SAMPLES) * FRAME_SAMPLES
    if preroll_ms:
        # the pre-roll is the audio right before the loud part, in order
        start = (20 - held) * 480
        reference = chirp(24_000, 1.0)[start:]
        assert best_correlation(reference, sink.samples, max_lag=400) > 0.85


def test_silence_dropped_before_the_preroll_is_heard_as_silence() -> None:
    # the kernel dropped the silence before speech: after 500 missing sequence
    # numbers the pipeline sees two quiet packets, then speech. The engine still
    # gets a whole pre-roll: the silence it missed, the two packets, then speech.
    sink = Sink(GateConfig(preroll_ms=240))
    stream = Stream()
    feed(sink, stream.packets(silence(0.02), QUIET))
    stream.seq += 500
    stream.ts += 500 * 960
    feed(sink, stream.packets(silence(0.04), QUIET))
    source = chirp(48_000, 0.48)
    feed(sink, stream.packets(source, LOUD))
    assert sink.audio.stream_restarts == 0
    assert sink.audio.packets_decoded == 2 + 24
    samples = sink.samples
    assert len(samples) == (12 + 24) * 480 // FRAME_SAMPLES * FRAME_SAMPLES
    assert not samples[: 10 * 480].any()  # the missing ten packets: zeros
    assert best_correlation(chirp(24_000, 0.48), samples[12 * 480 :], max_lag=400) > 0.85


def test_speech_end_after_configured_silence_once_with_padded_tail() -> None:
    sink = Sink(GateConfig(speech_end_ms=600))
    stream = Stream()
    feed(sink, stream.packets(chirp(48_000, 0.5), LOUD))  # 25 packets = 12000 samples
    frames_before = sink.audio.frames_out
    assert frames_before == 9  # 5760 of lead-in and 11520 samples, 480 waiting in the partial frame
    feed(sink, stream.packets(silence(0.58), QUIET))  # 29 packets: not yet 600 ms
    assert "end" not in sink.events
    feed(sink, stream.packets(silence(0.02), QUIET))
    assert sink.events.count("end") == 1
    assert sink.events[-1] == "end"
    assert sink.events[-2] == "frame"  # the tail frame, padded, goes before the end
    feed(sink, stream.packets(silence(2.0), QUIET))
    assert sink.events.count("end") == 1
    assert sink.audio.utterances == 1
    # hangover audio was delivered; nothing after the end
    assert sink.audio.packets_decoded == 25 + 30


def test_dtx_silence_counts_rtp_time_not_packets() -> None:
    sink = Sink(GateConfig(speech_end_ms=600))
    stream = Stream()
    feed(sink, stream.packets(chirp(48_000, 0.2), LOUD))
    # discontinuous transmission: one packet per 400 ms, sequence numbers contiguous
    feed(sink, stream.packets(silence(0.02), QUIET, ts_step=19_200))
    assert "end" not in sink.events
    feed(sink, stream.packets(silence(0.04), QUIET, ts_step=19_200))
    assert sink.events.count("end") == 1
    assert sink.audio.packets_lost == 0


def test_second_utterance_after_silence_starts_cleanly() -> None:
    sink = Sink(GateConfig(speech_end_ms=200, preroll_ms=100))
    stream = Stream()
    source = chirp(48_000, 0.4)
    for _ in range(3):
        feed(sink, stream.packets(source, LOUD))
        feed(sink, stream.packets(silence(0.6), QUIET))
    assert sink.events.count("end") == 3
    assert sink.audio.utterances == 3
    assert sink.audio.decode_errors == 0


def test_energy_vad_when_the_level_extension_is_absent() -> None:
    sink = Sink(GateConfig(speech_end_ms=400, preroll_ms=100))
    stream = Stream()
    feed(sink, stream.packets(silence(0.5), None))
    assert sink.frames == []
    assert sink.audio.packets_silent == 25
    assert sink.audio.packets_decoded == 25  # without the level, decoding is the only way
    feed(sink, stream.packets(chirp(48_000, 1.0), None))
    assert sink.audio.frames_out > 0
    feed(sink, stream.packets(silence(1.0), None))
    assert sink.events.count("end") == 1
    # audio went out: the chirp (and the pre-roll and hangover) in 80 ms frames
    assert sink.audio.frames_out >= 50 * 480 // FRAME_SAMPLES


def test_small_gap_is_concealed_and_keeps_timing() -> None:
    sink = Sink()
    packets = Stream().packets(chirp(48_000, 1.0), LOUD)
    del packets[10:13]
    feed(sink, packets)
    assert sink.audio.packets_lost == 3
    assert sink.audio.packets_concealed == 3
    # 47 decoded + 3 concealed: the timeline has no hole
    assert sink.audio.frames_out == (LEAD_IN + 50 * 480) // FRAME_SAMPLES
    assert best_correlation(chirp(24_000, 1.0), sink.samples[LEAD_IN:]) > 0.6


def test_late_and_duplicate_packets_are_dropped() -> None:
    sink = Sink()
    packets = Stream().packets(chirp(48_000, 0.4), LOUD)
    order = [*packets[:5], packets[3], packets[4], *packets[5:]]
    feed(sink, order)
    assert sink.audio.packets_late == 2
    assert sink.audio.packets_lost == 0
    assert sink.audio.packets_decoded == 20


def test_big_jump_restarts_without_concealing() -> None:
    sink = Sink()
    stream = Stream()
    feed(sink, stream.packets(chirp(48_000, 0.2), LOUD))
    stream.seq += 500
    stream.ts += 500 * 960
    feed(sink, stream.packets(chirp(48_000, 0.2), LOUD))
    assert sink.audio.stream_restarts == 1
    assert sink.audio.packets_concealed == 0
    assert sink.audio.packets_decoded == 20


def test_silence_skipped_upstream_is_not_a_restart() -> None:
    # media/silence_skip holds back silent packets outside utterances: the
    # next packets jump ahead, and the pre-roll right before speech is kept
    sink = Sink(GateConfig(speech_end_ms=100, preroll_ms=60))
    stream = Stream()
    feed(sink, stream.packets(chirp(48_000, 0.2), LOUD))
    feed(sink, stream.packets(silence(0.2), QUIET))
    assert sink.events[-1] == "end"
    stream.seq += 500
    stream.ts += 500 * 960
    feed(sink, stream.packets(silence(0.06), QUIET))  # the held pre-roll
    decoded = sink.audio.packets_decoded
    feed(sink, stream.packets(chirp(48_000, 0.2), LOUD))
    assert sink.audio.stream_restarts == 0
    assert sink.audio.packets_concealed == 0
    assert sink.audio.packets_decoded == decoded + 3 + 10  # pre-roll first, then speech
    assert sink.audio.utterances == 2


def test_sequence_wraparound_is_not_a_loss() -> None:
    sink = Sink()
    feed(sink, Stream(seq=65530, ts=(1 << 32) - 960 * 3).packets(chirp(48_000, 0.4), LOUD))
    assert sink.audio.packets_lost == 0
    assert sink.audio.packets_late == 0
    assert sink.audio.stream_restarts == 0
    assert sink.audio.packets_decoded == 20


def test_new_ssrc_restarts_the_stream() -> None:
    sink = Sink()
    feed(sink, Stream(ssrc=1).packets(chirp(48_000, 0.2), LOUD))
    feed(sink, Stream(ssrc=2, seq=3).packets(chirp(48_000, 0.2), LOUD))
    assert sink.audio.stream_restarts == 1
    assert sink.audio.packets_late == 0
    assert sink.audio.packets_decoded == 20


def test_idle_sender_ends_the_utterance() -> None:
    sink = Sink(GateConfig(speech_end_ms=600))
    stream = Stream()
    feed(sink, stream.packets(chirp(48_000, 0.2), LOUD))
    last = stream.time - 0.02
    assert not sink.audio.check_idle(last + 0.5)
    assert sink.audio.check_idle(last + 0.6)
    assert sink.events.count("end") == 1
    assert not sink.audio.check_idle(last + 5)


def test_corrupt_packets_are_counted_and_skipped() -> None:
    sink = Sink()
    packets = Stream().packets(chirp(48_000, 0.4), LOUD)
    packets[5].payload = b"\xff\xff\xff"
    packets[6].payload = b""
    feed(sink, packets)
    assert sink.audio.decode_errors == 2
    assert sink.audio.packets_decoded == 18


def test_bad_config_is_refused() -> None:
    with pytest.raises(ValueError):
        GateConfig(silence_level_dbov=200)
    with pytest.raises(ValueError):
        GateConfig(speech_end_ms=0)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.binary(max_size=200),
            st.integers(0, 65535),
            st.integers(0, (1 << 32) - 1),
            st.one_of(st.none(), st.integers(0, 127)),
            st.integers(0, 3),
        ),
        max_size=60,
    )
)
def test_garbage_packets_never_raise(
    items: list[tuple[bytes, int, int, int | None, int]],
) -> None:
    sink = Sink(GateConfig(speech_end_ms=40, preroll_ms=40))
    for payload, seq, ts, level, ssrc in items:
        sink.audio.feed(OpusRtp(payload, seq, ts, audio_level=level, ssrc=ssrc))
    counters = sink.audio.counters()
    assert counters["packets_in"] == len(items)
    assert all(f.shape == (FRAME_SAMPLES,) for f in sink.frames)
    assert counters["frames_out"] == len(sink.frames)
    sink.audio.close()
