"""Pure SDP rewriting around aiortc: keep one audio m-line, reject the rest.

aiortc cannot answer an m-line with port 0, and would build a decoding video
receiver for a video m-line. So the offer is cut down to the one audio
section we want before aiortc sees it, and the answer aiortc builds gets the
other sections back, rejected (port 0, ``a=inactive``), in their original
order, as RFC 8829 wants.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_TRANSPORT_ATTRIBUTES = ("a=ice-ufrag:", "a=ice-pwd:", "a=fingerprint:", "a=setup:")
_OPUS_RTPMAP = re.compile(r"^a=rtpmap:(\d+)\s+opus/48000", re.IGNORECASE)


class UnsupportedOffer(ValueError):
    """The offer has nothing we can receive (no audio m-line, or no Opus)."""


@dataclass(frozen=True, slots=True)
class Section:
    index: int
    kind: str
    port: str
    proto: str
    fmt: str
    mid: str | None
    lines: tuple[str, ...]

    def rejected(self, transport: list[str]) -> list[str]:
        """This section answered with port 0. ``transport`` (ICE credentials,
        fingerprint, setup) is repeated from the accepted section: strict
        parsers (aiortc's among them) want them in every section."""
        fmt = self.fmt or ("webrtc-datachannel" if self.kind == "application" else "0")
        out = [f"m={self.kind} 0 {self.proto} {fmt}", "c=IN IP4 0.0.0.0"]
        if self.mid is not None:
            out.append(f"a=mid:{self.mid}")
        out.append("a=inactive")
        out.extend(transport)
        if self.kind in ("audio", "video"):
            out.append("a=rtcp-mux")
            formats = set(self.fmt.split())
            for line in self.lines:
                codec_line = line.startswith(("a=rtpmap:", "a=fmtp:"))
                if codec_line and line.split(":", 1)[1].split(" ", 1)[0] in formats:
                    out.append(line)
        return out


@dataclass(frozen=True, slots=True)
class OfferPlan:
    offer: str
    """The offer cut down to the audio section (what aiortc gets)."""
    audio_index: int
    audio_mid: str | None
    opus_payload_type: int
    sections: tuple[Section, ...]
    """Every section of the original offer, in order."""


def _split(sdp: str) -> tuple[list[str], list[list[str]]]:
    lines = [line for line in sdp.replace("\r\n", "\n").split("\n") if line.strip()]
    session: list[str] = []
    media: list[list[str]] = []
    for line in lines:
        if line.startswith("m="):
            media.append([line])
        elif media:
            media[-1].append(line)
        else:
            session.append(line)
    return session, media


def _section(index: int, lines: list[str]) -> Section:
    parts = lines[0][2:].split()
    if len(parts) < 3:
        raise UnsupportedOffer(f"malformed m-line {index}: {lines[0]!r}")
    mid = next((line[6:].strip() for line in lines if line.startswith("a=mid:")), None)
    return Section(
        index=index,
        kind=parts[0],
        port=parts[1],
        proto=parts[2],
        fmt=" ".join(parts[3:]),
        mid=mid,
        lines=tuple(lines),
    )


def _opus_type(section: Section) -> int | None:
    for line in section.lines:
        match = _OPUS_RTPMAP.match(line)
        if match:
            return int(match.group(1))
    return None


def plan_offer(sdp: str) -> OfferPlan:
    """Pick the first audio section that sends Opus; raise ``UnsupportedOffer``
    when there is none."""
    if not sdp.lstrip().startswith("v="):
        raise UnsupportedOffer("not an SDP offer")
    session, media = _split(sdp)
    sections = tuple(_section(i, lines) for i, lines in enumerate(media))
    audio = [s for s in sections if s.kind == "audio" and s.port != "0"]
    if not audio:
        raise UnsupportedOffer("the offer has no audio m-line")
    chosen = None
    opus = None
    for section in audio:
        opus = _opus_type(section)
        if opus is not None:
            chosen = section
            break
    if chosen is None or opus is None:
        raise UnsupportedOffer("the offer's audio has no Opus (only Opus is accepted)")
    kept_session = []
    for line in session:
        if line.startswith("a=group:BUNDLE"):
            mids = line.split()[1:]
            if chosen.mid is not None and chosen.mid in mids:
                kept_session.append(f"a=group:BUNDLE {chosen.mid}")
            continue
        kept_session.append(line)
    offer = "\r\n".join([*kept_session, *chosen.lines]) + "\r\n"
    return OfferPlan(
        offer=offer,
        audio_index=chosen.index,
        audio_mid=chosen.mid,
        opus_payload_type=opus,
        sections=sections,
    )


def build_answer(plan: OfferPlan, audio_answer: str) -> str:
    """Put the rejected sections back around aiortc's one-section answer."""
    session, media = _split(audio_answer)
    if len(media) != 1:
        raise ValueError(f"expected one answered section, got {len(media)}")
    transport = [line for line in media[0] if line.startswith(_TRANSPORT_ATTRIBUTES)]
    out = list(session)
    for section in plan.sections:
        if section.index == plan.audio_index:
            out.extend(media[0])
        else:
            out.extend(section.rejected(transport))
    return "\r\n".join(out) + "\r\n"
