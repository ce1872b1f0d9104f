"""Opus decoding straight to 24 kHz mono float32, through libopus itself.

Why a hand-written ctypes binding instead of PyAV: PyAV's Opus decoder
ignores a requested 24 kHz output rate (it always returns 48 kHz, so a
resampler would follow), and it costs 28-40 us per 20 ms packet against
~25 us here. libopus resamples internally for free when the decoder is
created at 24 kHz, and downmixes stereo to mono when created with one
channel.

The library is Debian's ``libopus.so.0`` when present, else the copy that
PyAV's wheel ships in ``av.libs/`` (so no system package is needed).
"""

from __future__ import annotations

import ctypes
import importlib.util
import weakref
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt

DECODE_RATE = 24_000
"""The decoder's output rate: what every STT engine takes."""

MAX_PACKET_SAMPLES = DECODE_RATE * 120 // 1000
"""An Opus packet carries at most 120 ms of audio."""

_OPUS_OK = 0
_OPUS_APPLICATION_VOIP = 2048
_OPUS_SET_BITRATE = 4002
_OPUS_SET_INBAND_FEC = 4012
_OPUS_SET_PACKET_LOSS_PERC = 4014
_OPUS_RESET_STATE = 4028

_c_ubyte_p = ctypes.POINTER(ctypes.c_ubyte)


class OpusError(Exception):
    """libopus refused something; ``code`` is libopus' negative error code."""

    def __init__(self, code: int, what: str) -> None:
        self.code = code
        super().__init__(f"{what}: {_strerror(code)} ({code})")


class OpusUnavailable(RuntimeError):
    """Neither the system libopus nor PyAV's copy could be loaded."""


def _candidate_paths() -> Iterator[str]:
    yield "libopus.so.0"
    spec = importlib.util.find_spec("av")
    if spec is not None and spec.origin is not None:
        libs = Path(spec.origin).parent.parent / "av.libs"
        yield from (str(path) for path in sorted(libs.glob("libopus*.so*")))


def _load(paths: Iterator[str] | None = None) -> ctypes.CDLL:
    tried = []
    for path in paths if paths is not None else _candidate_paths():
        try:
            lib = ctypes.CDLL(path)
        except OSError as exc:
            tried.append(f"{path}: {exc}")
            continue
        _declare(lib)
        return lib
    raise OpusUnavailable("libopus not found; tried " + "; ".join(tried or ["nothing"]))


def _declare(lib: ctypes.CDLL) -> None:
    lib.opus_decoder_create.argtypes = [ctypes.c_int32, ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
    lib.opus_decoder_create.restype = ctypes.c_void_p
    lib.opus_decoder_destroy.argtypes = [ctypes.c_void_p]
    lib.opus_decoder_destroy.restype = None
    # packets go in as c_char_p: bytes pass straight through, no copy, and
    # libopus only reads them. Output buffers go in as plain addresses
    # (c_void_p): numpy's ``ctypes.data_as`` builds a pointer object that
    # sits in a reference cycle with its array, which only the cyclic
    # collector frees.
    lib.opus_decode_float.argtypes = [
        ctypes.c_void_p,
        ctypes.c_char_p,
        ctypes.c_int32,
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.c_int,
    ]
    lib.opus_decode_float.restype = ctypes.c_int
    # variadic: argtypes left open, so callers wrap every argument (a bare int
    # would be passed as a 32-bit C int and truncate the state pointer)
    lib.opus_decoder_ctl.restype = ctypes.c_int
    lib.opus_packet_get_nb_samples.argtypes = [ctypes.c_char_p, ctypes.c_int32, ctypes.c_int32]
    lib.opus_packet_get_nb_samples.restype = ctypes.c_int
    lib.opus_encoder_create.argtypes = [
        ctypes.c_int32,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.POINTER(ctypes.c_int),
    ]
    lib.opus_encoder_create.restype = ctypes.c_void_p
    lib.opus_encoder_destroy.argtypes = [ctypes.c_void_p]
    lib.opus_encoder_destroy.restype = None
    lib.opus_encode_float.argtypes = [
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int,
        _c_ubyte_p,
        ctypes.c_int32,
    ]
    lib.opus_encode_float.restype = ctypes.c_int32
    lib.opus_encoder_ctl.restype = ctypes.c_int
    lib.opus_strerror.argtypes = [ctypes.c_int]
    lib.opus_strerror.restype = ctypes.c_char_p
    lib.opus_get_version_string.argtypes = []
    lib.opus_get_version_string.restype = ctypes.c_char_p


_lib: ctypes.CDLL | None = None


def libopus() -> ctypes.CDLL:
    """The loaded library (loaded once, on first use)."""
    global _lib  # noqa: PLW0603 - one process-wide handle to a shared library
    if _lib is None:
        _lib = _load()
    return _lib


def version() -> str:
    raw: bytes = libopus().opus_get_version_string()
    return raw.decode()


def _strerror(code: int) -> str:
    try:
        raw: bytes | None = libopus().opus_strerror(code)
    except OpusUnavailable:
        return "libopus unavailable"
    return raw.decode() if raw else "unknown error"


class OpusDecoder:
    """One libopus decoder at 24 kHz mono. Single owner, not thread-safe.

    ``decode``/``conceal``/``recover`` return a view into the decoder's own
    output buffer: valid until the next call, copy it to keep it.
    """

    __slots__ = (
        "__weakref__",
        "_decode_float",
        "_finalizer",
        "_out",
        "_out_address",
        "_state",
        "last_samples",
    )

    def __init__(self) -> None:
        lib = libopus()
        error = ctypes.c_int(0)
        state = lib.opus_decoder_create(DECODE_RATE, 1, ctypes.byref(error))
        if error.value != _OPUS_OK or not state:
            raise OpusError(error.value, "opus_decoder_create")
        self._state: int = state
        self._finalizer = weakref.finalize(self, lib.opus_decoder_destroy, state)
        self._out: npt.NDArray[np.float32] = np.zeros(MAX_PACKET_SAMPLES, dtype=np.float32)
        self._out_address: int = self._out.ctypes.data
        self._decode_float = lib.opus_decode_float
        self.last_samples = DECODE_RATE * 20 // 1000
        """Samples of the last decoded packet: the size used to conceal a loss."""

    def _run(self, data: bytes | None, frame_size: int, fec: int) -> npt.NDArray[np.float32]:
        if not self._finalizer.alive:
            raise OpusError(-7, "decoder closed")  # OPUS_INVALID_STATE
        if data is None:
            count = self._decode_float(self._state, None, 0, self._out_address, frame_size, 0)
        else:
            count = self._decode_float(self._state, data, len(data), self._out_address, frame_size, fec)
        if count < 0:
            raise OpusError(count, "opus_decode_float")
        return self._out[:count]

    def decode(self, packet: bytes) -> npt.NDArray[np.float32]:
        """Decode one packet. Raises ``OpusError`` for a corrupt or empty
        packet (the decoder stays usable)."""
        if not packet:
            raise OpusError(-4, "empty packet")  # OPUS_INVALID_PACKET
        samples = self._run(packet, MAX_PACKET_SAMPLES, 0)
        if samples.size:
            self.last_samples = samples.size
        return samples

    def conceal(self, samples: int | None = None) -> npt.NDArray[np.float32]:
        """Packet-loss concealment for one lost packet (libopus' PLC)."""
        return self._run(None, self._frame_size(samples), 0)

    def recover(self, next_packet: bytes, samples: int | None = None) -> npt.NDArray[np.float32]:
        """Rebuild the packet lost just before ``next_packet`` from the in-band
        FEC data it carries (falls back to PLC inside libopus when there is
        none). Decode ``next_packet`` itself afterwards."""
        if not next_packet:
            return self.conceal(samples)
        return self._run(next_packet, self._frame_size(samples), 1)

    def _frame_size(self, samples: int | None) -> int:
        size = self.last_samples if samples is None else samples
        # libopus needs a multiple of 2.5 ms (60 samples at 24 kHz) for PLC/FEC
        size = max(60, min(MAX_PACKET_SAMPLES, size - size % 60))
        return size

    def reset(self) -> None:
        """Forget the decoder's history (after a jump in the stream)."""
        if self._finalizer.alive:
            state = ctypes.c_void_p(self._state)
            libopus().opus_decoder_ctl(state, ctypes.c_int(_OPUS_RESET_STATE))

    def close(self) -> None:
        """Free the libopus state now (idempotent; also freed when collected)."""
        self._finalizer()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive


def packet_samples(packet: bytes, rate: int = DECODE_RATE) -> int:
    """Samples the packet decodes to at ``rate``; raises ``OpusError`` when the
    packet's table of contents is invalid."""
    if not packet:
        raise OpusError(-4, "empty packet")
    count: int = libopus().opus_packet_get_nb_samples(packet, len(packet), rate)
    if count < 0:
        raise OpusError(count, "opus_packet_get_nb_samples")
    return count


_PacketBuffer = ctypes.c_ubyte * 1500
"""One type for every encoder's output buffer (a new ctypes type each time
would be a reference cycle per encoder)."""


class OpusEncoder:
    """A libopus encoder (tests and the load generator pre-encode with it)."""

    __slots__ = ("__weakref__", "_buffer", "_finalizer", "_state", "channels", "rate")

    def __init__(
        self,
        rate: int = 48_000,
        channels: int = 1,
        *,
        bitrate: int | None = None,
        fec: bool = False,
        expected_loss_percent: int = 0,
    ) -> None:
        lib = libopus()
        error = ctypes.c_int(0)
        state = lib.opus_encoder_create(rate, channels, _OPUS_APPLICATION_VOIP, ctypes.byref(error))
        if error.value != _OPUS_OK or not state:
            raise OpusError(error.value, "opus_encoder_create")
        self._state: int = state
        self._finalizer = weakref.finalize(self, lib.opus_encoder_destroy, state)
        self.rate = rate
        self.channels = channels
        self._buffer = _PacketBuffer()
        if bitrate is not None:
            self._ctl(_OPUS_SET_BITRATE, bitrate)
        if fec:
            self._ctl(_OPUS_SET_INBAND_FEC, 1)
            self._ctl(_OPUS_SET_PACKET_LOSS_PERC, expected_loss_percent or 20)

    def _ctl(self, request: int, value: int) -> None:
        code = libopus().opus_encoder_ctl(
            ctypes.c_void_p(self._state), ctypes.c_int(request), ctypes.c_int(value)
        )
        if code != _OPUS_OK:
            raise OpusError(code, f"opus_encoder_ctl({request})")

    def encode(self, pcm: npt.NDArray[np.float32]) -> bytes:
        """Encode one frame (2.5-60 ms) of interleaved float32 samples."""
        samples = np.ascontiguousarray(pcm, dtype=np.float32)
        frame_size = samples.size // self.channels
        count = libopus().opus_encode_float(
            self._state,
            samples.ctypes.data,
            frame_size,
            self._buffer,
            len(self._buffer),
        )
        if count < 0:
            raise OpusError(count, "opus_encode_float")
        return ctypes.string_at(self._buffer, count)

    def close(self) -> None:
        self._finalizer()
