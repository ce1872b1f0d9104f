"""One speaker's audio, inline on the event loop: Opus packets in, 80 ms frames out.

``SpeakerAudio.feed`` runs once per RTP packet, in the receive path itself:

1. order: duplicates and late packets are dropped (counted); a small gap is
   concealed (libopus FEC from the next packet, PLC before it); a big jump or
   a new SSRC restarts the decoder.
2. gate: when the packet carries the RFC 6464 audio level, a silent packet
   is not decoded at all; it only goes into a short pre-roll ring of packets.
   When speech starts the decoder is reset and the pre-roll packets are
   decoded first, which both warms the decoder (its state stays sane although
   silence was skipped) and delivers the first syllable. Without the
   extension every packet is decoded and a cheap energy VAD decides; the
   pre-roll then holds decoded audio.
3. frame: decoded 24 kHz mono float32 is cut into 1920-sample frames for
   ``on_frame``; after ``speech_end_ms`` of silence the partial frame is
   padded, sent, and ``on_speech_end`` is called once.

Silence is measured in RTP time (48 kHz for Opus), so discontinuous
transmission (one packet every 400 ms during silence) counts correctly.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from live_transcription.audio.opus import DECODE_RATE, OpusDecoder, OpusError
from live_transcription.audio.ring import DropOldestRing
from live_transcription.media.packet import OpusRtp
from live_transcription.stt.base import FRAME_SAMPLES

logger = logging.getLogger(__name__)

RTP_CLOCK = 48_000
"""Opus' RTP clock is 48 kHz whatever the audio inside."""

_SEQ_MOD = 1 << 16
_TS_MOD = 1 << 32
_NOMINAL_PACKET_MS = 20
_PACKET_SAMPLES = DECODE_RATE * _NOMINAL_PACKET_MS // 1000

Samples = npt.NDArray[np.float32]


@dataclass(frozen=True, slots=True)
class GateConfig:
    silence_level_dbov: int = 50
    """RFC 6464 level (in -dBov, 0 loudest, 127 silent) above which a packet is
    silence and is not decoded."""
    vad_threshold_dbfs: float = -45.0
    """Energy VAD (when the level extension is absent): a decoded packet whose
    RMS is below this is silence."""
    speech_end_ms: int = 600
    """Silence this long ends the utterance (``on_speech_end``)."""
    preroll_ms: int = 240
    """Audio kept from before speech starts, so the first syllable is heard."""
    max_conceal_packets: int = 5
    """A gap up to this many packets is concealed; a bigger jump restarts."""
    late_window_packets: int = 64
    """Packets up to this far behind are late (dropped); further back means
    the sender restarted its sequence numbers."""
    kernel_drop_margin_db: int | None = 15
    """While the speaker is silent, the kernel drops packets this much quieter
    than ``silence_level_dbov`` (``media/kernel_filter.py``); ``None``: off."""

    def __post_init__(self) -> None:
        if not 0 <= self.silence_level_dbov <= 127:
            raise ValueError("silence_level_dbov must be within 0..127")
        if self.speech_end_ms <= 0:
            raise ValueError("speech_end_ms must be positive")
        if self.preroll_ms < 0 or self.max_conceal_packets < 0 or self.late_window_packets < 1:
            raise ValueError("preroll_ms, max_conceal_packets and late_window_packets out of range")
        if self.kernel_drop_margin_db is not None and self.kernel_drop_margin_db < 0:
            raise ValueError("kernel_drop_margin_db must be >= 0")


class SpeakerAudio:
    """Per speaker, single owner (the speaker's receive path). Never raises on
    bad packets: they are logged once and counted."""

    def __init__(
        self,
        *,
        on_frame: Callable[[Samples], None],
        on_speech_end: Callable[[], None],
        config: GateConfig | None = None,
        label: str = "",
    ) -> None:
        self._config = config or GateConfig()
        self._on_frame = on_frame
        self._on_speech_end = on_speech_end
        self._label = label
        self._decoder = OpusDecoder()
        preroll_packets = max(1, self._config.preroll_ms // _NOMINAL_PACKET_MS)
        self._preroll_packets: DropOldestRing[OpusRtp] = DropOldestRing(preroll_packets)
        self._preroll_audio: DropOldestRing[Samples] = DropOldestRing(preroll_packets)
        self._use_preroll = self._config.preroll_ms > 0
        self._end_ticks = self._config.speech_end_ms * RTP_CLOCK // 1000
        self._vad_power = 10 ** (self._config.vad_threshold_dbfs / 10)  # mean square per sample
        self._frame: Samples = np.empty(FRAME_SAMPLES, dtype=np.float32)
        self._fill = 0
        self._ssrc: int | None = None
        self._last_seq = 0
        self._last_ts = 0
        self._last_arrival = 0.0
        self._have_ts = False
        self._level_mode: bool | None = None
        self._speaking = False
        self._silence_ticks = 0
        self._decoder_fresh = True
        self._warned_decode = False
        self.packets_in = 0
        self.packets_silent = 0
        self.packets_decoded = 0
        self.packets_lost = 0
        self.packets_late = 0
        self.packets_concealed = 0
        self.decode_errors = 0
        self.stream_restarts = 0
        self.frames_out = 0
        self.utterances = 0

    # --- public ------------------------------------------------------------------

    @property
    def speaking(self) -> bool:
        """Inside an utterance (its hangover included)."""
        return self._speaking

    @property
    def silence_level_dbov(self) -> int:
        return self._config.silence_level_dbov

    @property
    def kernel_drop_level(self) -> int | None:
        """Packets quieter than this level may be dropped by the kernel while
        silent (``None``: they all reach the process)."""
        margin = self._config.kernel_drop_margin_db
        return None if margin is None else min(127, self._config.silence_level_dbov + margin)

    @property
    def preroll_packets(self) -> int:
        """How many packets of silence before speech the pre-roll keeps."""
        return self._preroll_packets.capacity if self._use_preroll else 0

    def counters(self) -> dict[str, int]:
        return {
            "packets_in": self.packets_in,
            "packets_silent": self.packets_silent,
            "packets_decoded": self.packets_decoded,
            "packets_lost": self.packets_lost,
            "packets_late": self.packets_late,
            "packets_concealed": self.packets_concealed,
            "decode_errors": self.decode_errors,
            "stream_restarts": self.stream_restarts,
            "frames_out": self.frames_out,
            "utterances": self.utterances,
        }

    def feed(self, packet: OpusRtp) -> None:
        """Take one packet (in arrival order; reordering is handled here)."""
        self.packets_in += 1
        lost = self._order(packet)
        if lost < 0:
            return
        dt = (packet.timestamp - self._last_ts) % _TS_MOD if self._have_ts else 0
        if dt >= _TS_MOD // 2:
            dt = 0  # timestamp went backwards: ignore for silence timing
        self._last_ts = packet.timestamp
        self._last_arrival = packet.arrival_time
        self._have_ts = True
        level_mode = packet.audio_level is not None
        if level_mode != self._level_mode:
            self._level_mode = level_mode
            self._preroll_packets.clear()
            self._preroll_audio.clear()
            if not self._speaking:
                self._decoder_fresh = True
        if level_mode:
            assert packet.audio_level is not None
            self._feed_with_level(packet, packet.audio_level, lost, dt)
        else:
            self._feed_with_vad(packet, lost, dt)

    def check_idle(self, now: float) -> bool:
        """End the utterance when packets stopped arriving altogether (muted
        sender, network gone). ``now`` is on the clock of ``arrival_time``.
        Returns True when it ended one."""
        if self._speaking and now - self._last_arrival >= self._config.speech_end_ms / 1000:
            self._end_speech()
            return True
        return False

    def close(self) -> None:
        """Free the decoder. No frame is sent (the speaker is gone)."""
        self._decoder.close()
        self._preroll_packets.clear()
        self._preroll_audio.clear()

    # --- ordering ------------------------------------------------------------------

    def _order(self, packet: OpusRtp) -> int:
        """Packets lost just before this one (>= 0), or -1 to drop it."""
        seq = packet.sequence_number % _SEQ_MOD
        if self._ssrc != packet.ssrc:
            if self._ssrc is not None:
                self._restart()
            self._ssrc = packet.ssrc
            self._have_ts = False
            self._last_seq = seq
            return 0
        delta = (seq - self._last_seq + _SEQ_MOD // 2) % _SEQ_MOD - _SEQ_MOD // 2
        if delta <= 0 and -delta < self._config.late_window_packets:
            self.packets_late += 1
            return -1
        self._last_seq = seq
        if 0 < delta <= self._config.max_conceal_packets + 1:
            lost = delta - 1
            self.packets_lost += lost
            return lost
        if delta > 0 and self._level_mode and not self._speaking:
            # silence skipped before us (media/silence_skip): not a restart,
            # the decoder is reset when speech starts anyway
            self._have_ts = False
            self._preroll_packets.clear()
            return 0
        self._restart()  # a big jump either way: the sender restarted or we lost a lot
        return 0

    def _restart(self) -> None:
        self.stream_restarts += 1
        self._decoder_fresh = True
        self._have_ts = False
        self._preroll_packets.clear()
        self._preroll_audio.clear()

    # --- gate ----------------------------------------------------------------------

    def _feed_with_level(self, packet: OpusRtp, level: int, lost: int, dt: int) -> None:
        voiced = level <= self._config.silence_level_dbov
        if not voiced:
            self.packets_silent += 1
        if not self._speaking:
            if not voiced:
                if self._use_preroll:
                    self._preroll_packets.push(packet)
                return
            self._start_speech()
            self._reset_decoder()
            if self._use_preroll:
                # silence the kernel (or the skipper) dropped, or that was never sent:
                # the engine always hears a whole pre-roll before the first word
                missing = self._preroll_packets.capacity - len(self._preroll_packets)
                if missing > 0:
                    self._append(np.zeros(missing * _PACKET_SAMPLES, dtype=np.float32))
            for held in self._preroll_packets.drain():
                self._append_decoded(held.payload)
            self._append_decoded(packet.payload)
            return
        self._conceal(lost, packet.payload)
        self._append_decoded(packet.payload)
        self._track_silence(voiced, dt)

    def _feed_with_vad(self, packet: OpusRtp, lost: int, dt: int) -> None:
        if self._decoder_fresh:
            self._reset_decoder()
        elif self._speaking:
            self._conceal(lost, packet.payload)
        pcm = self._decode(packet.payload)
        if pcm is None:
            return
        voiced = float(np.dot(pcm, pcm)) > self._vad_power * pcm.size
        if not voiced:
            self.packets_silent += 1
        if not self._speaking:
            if not voiced:
                if self._use_preroll:
                    self._preroll_audio.push(pcm.copy())
                return
            self._start_speech()
            for held in self._preroll_audio.drain():
                self._append(held)
            self._append(pcm)
            return
        self._append(pcm)
        self._track_silence(voiced, dt)

    def _track_silence(self, voiced: bool, dt: int) -> None:
        if voiced:
            self._silence_ticks = 0
            return
        self._silence_ticks += dt
        if self._silence_ticks >= self._end_ticks:
            self._end_speech()

    def _start_speech(self) -> None:
        self._speaking = True
        self._silence_ticks = 0
        self.utterances += 1

    def _end_speech(self) -> None:
        self._speaking = False
        self._silence_ticks = 0
        if self._level_mode:
            self._decoder_fresh = True  # silence will be skipped undecoded
        if self._fill:
            self._frame[self._fill :] = 0.0
            self._emit()
        self._on_speech_end()

    # --- decode and frame ------------------------------------------------------------

    def _reset_decoder(self) -> None:
        self._decoder.reset()
        self._decoder_fresh = False

    def _conceal(self, lost: int, next_payload: bytes) -> None:
        if lost <= 0:
            return
        try:
            for _ in range(lost - 1):
                self._append(self._decoder.conceal())
            # the next packet may carry the last lost one as in-band FEC
            self._append(self._decoder.recover(next_payload))
            self.packets_concealed += lost
        except OpusError as exc:
            self._decode_failed(exc)

    def _decode(self, payload: bytes) -> Samples | None:
        try:
            pcm = self._decoder.decode(payload)
        except OpusError as exc:
            self._decode_failed(exc)
            return None
        self.packets_decoded += 1
        return pcm

    def _append_decoded(self, payload: bytes) -> None:
        pcm = self._decode(payload)
        if pcm is not None:
            self._append(pcm)

    def _decode_failed(self, exc: OpusError) -> None:
        self.decode_errors += 1
        if not self._warned_decode:
            self._warned_decode = True
            logger.warning("speaker %s: undecodable Opus packet skipped: %s", self._label, exc)

    def _append(self, pcm: Samples) -> None:
        offset = 0
        size = pcm.size
        while offset < size:
            take = min(FRAME_SAMPLES - self._fill, size - offset)
            self._frame[self._fill : self._fill + take] = pcm[offset : offset + take]
            self._fill += take
            offset += take
            if self._fill == FRAME_SAMPLES:
                self._emit()

    def _emit(self) -> None:
        frame = self._frame
        # a fresh buffer per frame: the consumer keeps the one it was given
        self._frame = np.empty(FRAME_SAMPLES, dtype=np.float32)
        self._fill = 0
        self.frames_out += 1
        self._on_frame(frame)
