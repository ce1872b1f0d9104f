"""Reading the RFC 6464 audio level from a still-encrypted SRTP datagram.

SRTP encrypts the payload only; the RTP header and its extensions stay in
the clear (RFC 3711; header-extension encryption, RFC 6904, is not
negotiated by aiortc). So whether a packet is silence can be read before
decryption, which is what lets a silent participant's packets be skipped
without paying for SRTP, RTP parsing and statistics (``silence_skip``).

``payload_bounds`` finds the payload of the decrypted packet, for the
audio fast path (``lean_receiver``) that goes around aiortc's RTP parsing.

Pure functions on bytes; they never raise on malformed input (a datagram
that is not what they expect gives ``None`` and takes the normal path).
"""

from __future__ import annotations

_RTP_VERSION = 2
_FIXED_HEADER = 12
_ONE_BYTE_PROFILE = 0xBEDE
_TWO_BYTE_PROFILE_MASK = 0xFFF0
_TWO_BYTE_PROFILE = 0x1000


def rtp_payload_type(datagram: bytes) -> int | None:
    """The payload type of an RTP datagram; ``None`` for anything else
    (STUN, DTLS, RTCP, too short). RFC 7983 demultiplexing: RTP and RTCP
    start with 128..191; RTCP packet types 192..223 fill the second byte."""
    if len(datagram) < _FIXED_HEADER:
        return None
    first = datagram[0]
    if first >> 6 != _RTP_VERSION:
        return None
    second = datagram[1]
    if 192 <= second <= 223:
        return None  # RTCP multiplexed on the same port (RFC 5761)
    return second & 0x7F


def audio_level(datagram: bytes, extension_id: int) -> int | None:
    """The RFC 6464 level (0 loudest .. 127 silent, -dBov) carried in the
    header extension numbered ``extension_id``, or ``None`` when the datagram
    has none (or is not a well-formed RTP packet)."""
    size = len(datagram)
    if size < _FIXED_HEADER:
        return None
    first = datagram[0]
    if not first & 0x10:
        return None  # no header extension
    offset = _FIXED_HEADER + 4 * (first & 0x0F)
    if offset + 4 > size:
        return None
    profile = (datagram[offset] << 8) | datagram[offset + 1]
    end = offset + 4 + 4 * ((datagram[offset + 2] << 8) | datagram[offset + 3])
    if end > size:
        return None
    position = offset + 4
    if profile == _ONE_BYTE_PROFILE:
        while position < end:
            byte = datagram[position]
            if byte == 0:
                position += 1  # padding
                continue
            element_id = byte >> 4
            if element_id == 15:
                return None  # reserved: stop parsing (RFC 8285 4.2)
            length = (byte & 0x0F) + 1
            if position + 1 + length > end:
                return None
            if element_id == extension_id:
                return datagram[position + 1] & 0x7F
            position += 1 + length
        return None
    if profile & _TWO_BYTE_PROFILE_MASK == _TWO_BYTE_PROFILE:
        while position < end:
            element_id = datagram[position]
            if element_id == 0:
                position += 1  # padding
                continue
            if position + 2 > end:
                return None
            length = datagram[position + 1]
            if position + 2 + length > end:
                return None
            if element_id == extension_id and length >= 1:
                return datagram[position + 2] & 0x7F
            position += 2 + length
        return None
    return None


def payload_bounds(packet: bytes) -> tuple[int, int] | None:
    """Where the payload of a (decrypted) RTP packet starts and ends: after
    the CSRCs and the header extension, before the padding. ``None`` when the
    header does not fit the packet."""
    size = len(packet)
    if size < _FIXED_HEADER or packet[0] >> 6 != _RTP_VERSION:
        return None
    first = packet[0]
    start = _FIXED_HEADER + 4 * (first & 0x0F)
    if first & 0x10:
        if start + 4 > size:
            return None
        start += 4 + 4 * ((packet[start + 2] << 8) | packet[start + 3])
    end = size
    if first & 0x20:
        padding = packet[-1]
        if padding == 0:
            return None
        end -= padding
    if start > end:
        return None
    return start, end
