"""Pre-encoded Opus talk/silence patterns for the load generator.

One period of audio (talk, then pause) is synthesised and encoded once with
libopus at 48 kHz, 20 ms per packet; every publisher then loops the same
payloads, so sending costs no encoding at all. Each packet carries its
RFC 6464 audio level (computed from the PCM it was encoded from, as a
browser does) so the receiver can skip silence without decoding it.

Silent participants send a packet every 20 ms too (browsers do not use Opus
DTX in WebRTC by default): a microphone noise floor at about -75 dBFS, which
is an audio level well above the receiver's silence threshold.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from live_transcription.audio.opus import OpusEncoder

RATE = 48_000
PACKET_MS = 20
PACKET_SAMPLES = RATE * PACKET_MS // 1000
SILENT_LEVEL = 127
"""RFC 6464: 127 -dBov is digital silence, 0 the loudest."""

Pcm = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class Pattern:
    """One loop of packets: ``talk_packets`` of speech first, then the pause."""

    payloads: tuple[bytes, ...]
    levels: tuple[int, ...]
    talk_packets: int

    @property
    def period(self) -> int:
        return len(self.payloads)

    @property
    def pause_packets(self) -> int:
        return self.period - self.talk_packets

    def __post_init__(self) -> None:
        if len(self.payloads) != len(self.levels) or not self.payloads:
            raise ValueError("a pattern needs as many levels as payloads, at least one")
        if not 0 <= self.talk_packets <= len(self.payloads):
            raise ValueError("talk_packets out of range")


def audio_level(pcm: Pcm) -> int:
    """RFC 6464 level of one packet's PCM (float in [-1, 1]): -dBov of its
    RMS, clamped to 0..127 (127 = silence), as RFC 6465 appendix A says."""
    if pcm.size == 0:
        return SILENT_LEVEL
    rms = float(np.sqrt(np.mean(np.square(pcm, dtype=np.float64))))
    if rms <= 0.0:
        return SILENT_LEVEL
    dbov = 20.0 * np.log10(min(rms, 1.0))
    return int(min(SILENT_LEVEL, max(0, round(-dbov))))


def speech_like(seconds: float, *, seed: int = 0) -> Pcm:
    """A voiced, speech-like signal at 48 kHz: a harmonic source with a
    wandering pitch (100-180 Hz), two moving formant-ish peaks and a
    syllable envelope of about four syllables a second."""
    rng = np.random.default_rng(seed)
    n = int(seconds * RATE)
    if n == 0:
        return np.zeros(0, dtype=np.float32)
    t = np.arange(n) / RATE
    f0 = 140 + 30 * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, 6)) + 10 * np.sin(2 * np.pi * 3.1 * t)
    phase = 2 * np.pi * np.cumsum(f0) / RATE
    signal = np.zeros(n)
    formant1 = 600 + 250 * np.sin(2 * np.pi * 1.3 * t)
    formant2 = 1800 + 500 * np.sin(2 * np.pi * 0.9 * t + 1.0)
    for harmonic in range(1, 30):
        freq = harmonic * f0
        weight = (
            np.exp(-(((freq - formant1) / 250) ** 2)) + 0.5 * np.exp(-(((freq - formant2) / 350) ** 2)) + 0.05
        ) / harmonic**0.5
        signal += weight * np.sin(harmonic * phase)
    syllables = 0.25 + 0.75 * np.abs(np.sin(2 * np.pi * 2.0 * t + rng.uniform(0, 3))) ** 0.7
    signal *= syllables
    signal += 0.01 * rng.standard_normal(n)
    peak = float(np.max(np.abs(signal))) or 1.0
    return (0.4 * signal / peak).astype(np.float32)


def noise_floor(seconds: float, *, seed: int = 0, dbfs: float = -75.0) -> Pcm:
    rng = np.random.default_rng(seed + 1)
    return (10 ** (dbfs / 20) * rng.standard_normal(int(seconds * RATE))).astype(np.float32)


def build_pattern(talk_ms: int, pause_ms: int, *, seed: int = 0, bitrate: int = 32_000) -> Pattern:
    """Encode ``talk_ms`` of speech then ``pause_ms`` of noise floor (both
    multiples of 20 ms) into one loop of Opus packets. ``talk_ms=0`` is a
    participant who never speaks."""
    if talk_ms % PACKET_MS or pause_ms % PACKET_MS or talk_ms < 0 or pause_ms < 0:
        raise ValueError("talk_ms and pause_ms must be non-negative multiples of 20 ms")
    if talk_ms + pause_ms == 0:
        raise ValueError("an empty pattern")
    pcm = np.concatenate(
        [speech_like(talk_ms / 1000, seed=seed), noise_floor(pause_ms / 1000, seed=seed)]
    ).astype(np.float32)
    encoder = OpusEncoder(RATE, 1, bitrate=bitrate)
    payloads = []
    levels = []
    try:
        for start in range(0, pcm.size, PACKET_SAMPLES):
            chunk = pcm[start : start + PACKET_SAMPLES]
            payloads.append(encoder.encode(chunk))
            levels.append(audio_level(chunk))
    finally:
        encoder.close()
    return Pattern(tuple(payloads), tuple(levels), talk_ms // PACKET_MS)
