from __future__ import annotations

import gc
import weakref

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from live_transcription.audio import opus
from live_transcription.audio.opus import OpusDecoder, OpusEncoder, OpusError, OpusUnavailable


def chirp(rate: int, seconds: float, channels: int = 1) -> npt.NDArray[np.float32]:
    t = np.arange(int(rate * seconds)) / rate
    # 200 Hz -> 3 kHz sweep: no lag of it looks like another, unlike a pure tone
    phase = 2 * np.pi * (200 * t + (2800 / (2 * seconds)) * t * t)
    mono = (0.4 * np.sin(phase)).astype(np.float32)
    if channels == 1:
        return mono
    return np.repeat(mono, channels)


def encode(signal: npt.NDArray[np.float32], rate: int = 48_000, channels: int = 1) -> list[bytes]:
    encoder = OpusEncoder(rate, channels)
    step = rate * 20 // 1000 * channels
    packets = [encoder.encode(signal[i : i + step]) for i in range(0, signal.size - step + 1, step)]
    encoder.close()
    return packets


def best_correlation(
    reference: npt.NDArray[np.float32], decoded: npt.NDArray[np.float32], max_lag: int = 1000
) -> float:
    """Highest normalised correlation over the codec's delay (decoded lags)."""
    best = 0.0
    n = min(reference.size, decoded.size) - max_lag
    ref = reference[:n]
    for lag in range(max_lag):
        seg = decoded[lag : lag + n]
        denom = float(np.linalg.norm(ref) * np.linalg.norm(seg))
        if denom:
            best = max(best, float(np.dot(ref, seg)) / denom)
    return best


def test_decodes_to_24khz_mono_matching_the_source() -> None:
    source_48k = chirp(48_000, 1.0)
    decoder = OpusDecoder()
    pieces = []
    for packet in encode(source_48k):
        pcm = decoder.decode(packet)
        assert pcm.dtype == np.float32
        assert pcm.size == 480  # 20 ms at 24 kHz, not 48 kHz
        pieces.append(pcm.copy())
    decoded = np.concatenate(pieces)
    reference_24k = chirp(24_000, 1.0)
    assert best_correlation(reference_24k, decoded) > 0.9
    decoder.close()


def test_stereo_stream_is_downmixed_to_mono() -> None:
    packets = encode(chirp(48_000, 0.5, channels=2), channels=2)
    decoder = OpusDecoder()
    decoded = np.concatenate([decoder.decode(p).copy() for p in packets])
    assert decoded.size == len(packets) * 480
    assert best_correlation(chirp(24_000, 0.5), decoded) > 0.9


def test_corrupt_packet_raises_and_decoder_stays_usable() -> None:
    packets = encode(chirp(48_000, 0.2))
    decoder = OpusDecoder()
    decoder.decode(packets[0])
    with pytest.raises(OpusError):
        decoder.decode(b"\xff\xff\xff")  # code 3 frame count 0
    with pytest.raises(OpusError):
        decoder.decode(b"")
    assert decoder.decode(packets[1]).size == 480


def test_concealment_and_fec_give_one_packet_of_audio() -> None:
    encoder = OpusEncoder(48_000, 1, fec=True, expected_loss_percent=30, bitrate=24_000)
    source = chirp(48_000, 0.5)
    packets = [encoder.encode(source[i : i + 960]) for i in range(0, source.size, 960)]
    decoder = OpusDecoder()
    decoder.decode(packets[0])
    assert decoder.conceal().size == 480
    recovered = decoder.recover(packets[3])
    assert recovered.size == 480
    assert np.all(np.isfinite(recovered))
    assert decoder.decode(packets[3]).size == 480


def test_packet_samples_reads_the_toc() -> None:
    packet = encode(chirp(48_000, 0.1))[0]
    assert opus.packet_samples(packet) == 480
    assert opus.packet_samples(packet, 48_000) == 960
    with pytest.raises(OpusError):
        opus.packet_samples(b"")


def test_closed_decoder_refuses_and_close_is_idempotent() -> None:
    decoder = OpusDecoder()
    decoder.close()
    decoder.close()
    assert decoder.closed
    decoder.reset()  # no-op, no crash
    with pytest.raises(OpusError):
        decoder.decode(b"\x08\x00")


def test_falls_back_to_the_copy_in_pyav_wheel() -> None:
    bundled = [path for path in opus._candidate_paths() if "av.libs" in path]
    assert bundled, "PyAV wheel ships no libopus: the fallback has nothing to load"
    lib = opus._load(iter(["/nonexistent/libopus.so.0", *bundled]))
    assert lib.opus_get_version_string().startswith(b"libopus")


def test_no_library_is_a_clear_error() -> None:
    with pytest.raises(OpusUnavailable, match="libopus not found"):
        opus._load(iter(["/nonexistent/libopus.so.0"]))


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=1500))
def test_garbage_never_raises_anything_but_opus_error(payload: bytes) -> None:
    decoder = OpusDecoder()
    try:
        pcm = decoder.decode(payload)
    except OpusError:
        return
    assert pcm.size <= opus.MAX_PACKET_SAMPLES
    assert np.all(np.isfinite(pcm))


def test_codecs_leave_nothing_for_the_cyclic_collector() -> None:
    # a reference cycle (numpy's ctypes.data_as makes one per call) would
    # wait for the collector's oldest generation, once per speaker and packet
    def use_and_drop() -> list[weakref.ref[object]]:
        decoder = OpusDecoder()
        encoder = OpusEncoder(48_000, 1)
        for _ in range(5):
            decoder.decode(encoder.encode(np.zeros(960, dtype=np.float32)))
        return [weakref.ref(decoder), weakref.ref(encoder)]

    use_and_drop()  # loads the library
    gc.collect()
    gc.disable()
    try:
        refs = use_and_drop()
        assert [ref() for ref in refs] == [None, None]
        assert gc.collect() == 0
    finally:
        gc.enable()
