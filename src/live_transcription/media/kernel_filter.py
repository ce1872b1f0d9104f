"""Drop a silent participant's packets in the kernel, before the process
ever wakes up for them.

Skipping silence before decryption (``silence_skip``) still pays, for each
datagram, a wake-up, a ``recvfrom`` and the header check in Python: about
two thirds of what a silent participant costs (bench/notes.md). A classic
BPF program attached to the peer's UDP sockets (``SO_ATTACH_FILTER``) reads
the same RFC 6464 level from the clear RTP header and drops the packet in
the kernel's receive path. Hand-written because no library builds socket
filters for RTP header extensions; the program is small, checked against
the Python parser (``rtp_level.audio_level``) on a real socket in the
tests, and only ever *drops* packets that parse as silent audio:

* anything that is not RTP of the audio payload types (STUN, DTLS, RTCP),
  or carries no level, or whose extensions do not parse within the unrolled
  walk, is accepted, and the Python path decides as before;
* one packet in ``2**pass_every_log2`` (by sequence number) is accepted
  whatever its level: the skipper still lets libsrtp see one packet in a
  few hundred (the rollover counter) and the inactivity watchdog still sees
  the peer alive;
* the kernel drops only what is quieter than ``drop_quieter_than``, which
  the skipper sets below its own silence threshold, so the quiet lead-in of
  speech still reaches the pre-roll.

The skipper attaches the program when a participant has been silent for a
whole pre-roll and detaches it at the first voiced packet (``SilenceSkipper``).
Linux only; elsewhere (or if the kernel refuses) the skipper works alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import socket
import struct
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

logger = logging.getLogger(__name__)

SO_ATTACH_FILTER = getattr(socket, "SO_ATTACH_FILTER", 26)
SO_DETACH_FILTER = getattr(socket, "SO_DETACH_FILTER", 27)
SUPPORTED = sys.platform.startswith("linux")

# linux/filter.h
_LD, _LDX, _ST, _ALU, _JMP, _RET, _MISC = 0x00, 0x01, 0x02, 0x04, 0x05, 0x06, 0x07
_W, _H, _B = 0x00, 0x08, 0x10
_ABS, _IND, _MEM, _LEN, _MSH = 0x20, 0x40, 0x60, 0x80, 0xA0
_ADD, _AND, _LSH, _RSH = 0x00, 0x50, 0x60, 0x70
_JA, _JEQ, _JGT, _JGE, _JSET = 0x00, 0x10, 0x20, 0x30, 0x40
_K, _X = 0x00, 0x08
_TAX, _TXA = 0x00, 0x80

_ACCEPT = 0x7FFFFFFF  # keep the whole datagram
_DROP = 0
_UDP_HEADER = 8  # a UDP socket's filter sees the UDP header first
_RTP = _UDP_HEADER
MAX_ELEMENTS = 8  # header extension elements walked before giving up (accept)


@dataclass(frozen=True, slots=True)
class _Jump:
    code: int
    k: int
    true: str | None  # label; None: the next instruction
    false: str | None


_Instruction = tuple[int, int] | _Jump | str  # (code, k), a jump, or a label


def _assemble(program: list[_Instruction]) -> list[tuple[int, int, int, int]]:
    labels: dict[str, int] = {}
    index = 0
    for item in program:
        if isinstance(item, str):
            labels[item] = index
        else:
            index += 1
    out: list[tuple[int, int, int, int]] = []
    for item in program:
        if isinstance(item, str):
            continue
        if isinstance(item, _Jump) and item.code == _JMP | _JA:
            assert item.true is not None  # an unconditional jump's offset is its k
            out.append((item.code, 0, 0, labels[item.true] - (len(out) + 1)))
        elif isinstance(item, _Jump):
            here = len(out) + 1
            jt = 0 if item.true is None else labels[item.true] - here
            jf = 0 if item.false is None else labels[item.false] - here
            if not (0 <= jt <= 255 and 0 <= jf <= 255):
                raise ValueError("BPF jump out of range")
            out.append((item.code, jt, jf, item.k))
        else:
            out.append((item[0], 0, 0, item[1]))
    return out


def silence_filter(
    extension_id: int,
    payload_types: Iterable[int],
    drop_quieter_than: int,
    pass_every_log2: int = 7,
) -> bytes:
    """The ``struct sock_filter`` array (native byte order) that drops RTP
    packets of ``payload_types`` whose one-byte-header audio level element
    ``extension_id`` says quieter than ``drop_quieter_than`` (-dBov, 0..127:
    a level strictly greater is dropped), except one sequence number in
    ``2**pass_every_log2``."""
    if not 1 <= extension_id <= 14:
        raise ValueError("a one-byte header extension id is 1..14")
    if not 0 <= drop_quieter_than <= 127:
        raise ValueError("drop_quieter_than is a level, 0..127")
    if not 0 <= pass_every_log2 <= 15:
        raise ValueError("pass_every_log2 must be within 0..15")
    types = sorted(set(payload_types))
    if not types or any(not 0 <= t <= 127 for t in types):
        raise ValueError("payload types are 0..127, at least one")
    first = _RTP + 16
    p: list[_Instruction] = []
    # a load past the end makes the program return 0 (drop): check the length first
    p += [(_LD | _W | _LEN, 0), _Jump(_JMP | _JGE | _K, first, None, "accept")]
    # RTP version 2 with the extension bit (RTCP and the rest have other first bytes
    # or second bytes outside the payload types)
    p += [(_LD | _B | _ABS, _RTP), (_ALU | _AND | _K, 0xD0), _Jump(_JMP | _JEQ | _K, 0x90, None, "accept")]
    p += [(_LD | _B | _ABS, _RTP + 1), (_ALU | _AND | _K, 0x7F)]
    for index, payload_type in enumerate(types):
        last = index == len(types) - 1
        p.append(_Jump(_JMP | _JEQ | _K, payload_type, "audio", "accept" if last else None))
    p.append("audio")
    # one sequence number in 2**n gets through whatever its level
    mask = (1 << pass_every_log2) - 1
    p += (
        [(_LD | _H | _ABS, _RTP + 2), _Jump(_JMP | _JSET | _K, mask, None, "accept")]
        if mask
        else [_Jump(_JMP | _JA, 0, "accept", "accept")]
    )
    # X = 4 * CSRC count: the extension header is at RTP + 12 + X
    p += [(_LDX | _B | _MSH, _RTP), (_LD | _H | _IND, _RTP + 12)]
    p.append(_Jump(_JMP | _JEQ | _K, 0xBEDE, None, "accept"))
    # elements start at RTP + 16 + X; M[0] = X + 4 * length is where they end,
    # which must lie within the datagram
    p += [(_LD | _H | _IND, _RTP + 14), (_ALU | _LSH | _K, 2), (_ALU | _ADD | _X, 0), (_ST, 0)]
    p += [(_ALU | _ADD | _K, first), (_MISC | _TAX, 0), (_LD | _W | _LEN, 0)]
    p += [_Jump(_JMP | _JGE | _X, 0, None, "accept"), (_LDX | _B | _MSH, _RTP)]
    for step in range(MAX_ELEMENTS):
        here, there = f"element{step}", f"element{step + 1}"
        last = step == MAX_ELEMENTS - 1
        following = "accept" if last else there
        p.append(here)
        # the walk ends at the end of the block: A = end, accept unless end > X
        p += [(_LD | _MEM, 0), _Jump(_JMP | _JGT | _X, 0, None, "accept")]
        p += [(_LD | _B | _IND, first), _Jump(_JMP | _JEQ | _K, 0, f"pad{step}", None)]
        p += [(_ALU | _RSH | _K, 4), _Jump(_JMP | _JEQ | _K, extension_id, "found", None)]
        p.append(_Jump(_JMP | _JEQ | _K, 15, "accept", None))  # reserved id: stop (RFC 8285)
        # X += 1 + (len + 1)
        p += [(_LD | _B | _IND, first), (_ALU | _AND | _K, 0x0F), (_ALU | _ADD | _K, 2)]
        p += [(_ALU | _ADD | _X, 0), (_MISC | _TAX, 0), _Jump(_JMP | _JA, 0, following, following)]
        p.append(f"pad{step}")
        p += [(_MISC | _TXA, 0), (_ALU | _ADD | _K, 1), (_MISC | _TAX, 0)]
        p.append(_Jump(_JMP | _JA, 0, following, following))
    p.append("found")
    # the level byte must lie inside the block too: end > X + 1
    p += [(_MISC | _TXA, 0), (_ALU | _ADD | _K, 1), (_MISC | _TAX, 0)]
    p += [(_LD | _MEM, 0), _Jump(_JMP | _JGT | _X, 0, None, "accept")]
    p += [(_LD | _B | _IND, first), (_ALU | _AND | _K, 0x7F)]
    p.append(_Jump(_JMP | _JGT | _K, drop_quieter_than, "drop", "accept"))
    p += ["accept", (_RET | _K, _ACCEPT), "drop", (_RET | _K, _DROP)]
    return b"".join(struct.pack("=HBBI", code, jt, jf, k) for code, jt, jf, k in _assemble(p))


class HasFileno(Protocol):
    def fileno(self) -> int: ...


class SocketFilters:
    """Attaches one program to a peer's UDP sockets and takes it off again.

    Holds duplicates of the sockets' descriptors (a filter belongs to the
    socket, so it works whichever loop or transport owns the original);
    ``close`` releases them. A kernel that refuses the program turns the
    filters off for good (logged once)."""

    def __init__(self, sockets: Iterable[HasFileno]) -> None:
        self._sockets = [socket.socket(fileno=_dup(s)) for s in sockets] if SUPPORTED else []
        self.attached = False
        self.failed = not self._sockets
        self.attaches = 0

    def attach(self, program: bytes) -> bool:
        if self.failed:
            return False
        code = ctypes.create_string_buffer(program, len(program))
        fprog = struct.pack("@HL", len(program) // 8, ctypes.addressof(code))
        try:
            for sock in self._sockets:
                sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
        except OSError as exc:
            logger.warning("kernel silence filter refused, silence is skipped in the process: %s", exc)
            self.failed = True
            self.detach()
            return False
        self.attached = True
        self.attaches += 1
        return True

    def detach(self) -> None:
        if not self.attached:
            return
        self.attached = False
        for sock in self._sockets:
            with contextlib.suppress(OSError):  # no filter on that one (refused half-way)
                sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)

    def close(self) -> None:
        self.detach()
        for sock in self._sockets:
            sock.close()
        self._sockets = []
        self.failed = True


def _dup(sock: HasFileno) -> int:
    return os.dup(sock.fileno())
