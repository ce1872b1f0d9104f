from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from live_transcription.media.sdp import UnsupportedOffer, build_answer, plan_offer

# shaped like a Janus VideoRoom subscriber offer: video first, audio, data
JANUS_OFFER = """v=0
o=- 1700000000 1 IN IP4 127.0.0.1
s=VideoRoom 1234
t=0 0
a=group:BUNDLE v0 a1 d2
a=ice-options:trickle
a=msid-semantic: WMS *
m=video 9 UDP/TLS/RTP/SAVPF 96 97
c=IN IP4 127.0.0.1
a=sendonly
a=mid:v0
a=rtcp-mux
a=ice-ufrag:abcd
a=ice-pwd:abcdefghijklmnopqrstuv
a=fingerprint:sha-256 AA:BB
a=setup:actpass
a=rtpmap:96 VP8/90000
a=rtpmap:97 rtx/90000
a=fmtp:97 apt=96
m=audio 9 UDP/TLS/RTP/SAVPF 111 0
c=IN IP4 127.0.0.1
a=sendonly
a=mid:a1
a=rtcp-mux
a=ice-ufrag:abcd
a=ice-pwd:abcdefghijklmnopqrstuv
a=fingerprint:sha-256 AA:BB
a=setup:actpass
a=rtpmap:111 opus/48000/2
a=fmtp:111 useinbandfec=1
a=rtpmap:0 PCMU/8000
a=extmap:1 urn:ietf:params:rtp-hdrext:ssrc-audio-level
m=application 9 UDP/DTLS/SCTP webrtc-datachannel
c=IN IP4 127.0.0.1
a=mid:d2
a=sctp-port:5000
"""

ANSWER_FROM_AIORTC = """v=0
o=- 1 1 IN IP4 0.0.0.0
s=-
t=0 0
a=group:BUNDLE a1
a=msid-semantic:WMS *
m=audio 40000 UDP/TLS/RTP/SAVPF 111
c=IN IP4 127.0.0.1
a=recvonly
a=mid:a1
a=rtcp-mux
a=ice-ufrag:wxyz
a=ice-pwd:0123456789012345678901
a=fingerprint:sha-256 CC:DD
a=setup:active
a=rtpmap:111 opus/48000/2
a=extmap:1 urn:ietf:params:rtp-hdrext:ssrc-audio-level
"""


def test_offer_is_cut_to_the_opus_audio_section() -> None:
    plan = plan_offer(JANUS_OFFER)
    assert plan.audio_index == 1
    assert plan.audio_mid == "a1"
    assert plan.opus_payload_type == 111
    assert plan.offer.count("m=") == 1
    assert "m=audio 9" in plan.offer
    assert "a=group:BUNDLE a1\r\n" in plan.offer
    assert "VP8" not in plan.offer


def test_answer_rejects_every_other_section_in_order() -> None:
    plan = plan_offer(JANUS_OFFER)
    answer = build_answer(plan, ANSWER_FROM_AIORTC)
    m_lines = [line for line in answer.split("\r\n") if line.startswith("m=")]
    assert m_lines == [
        "m=video 0 UDP/TLS/RTP/SAVPF 96 97",
        "m=audio 40000 UDP/TLS/RTP/SAVPF 111",
        "m=application 0 UDP/DTLS/SCTP webrtc-datachannel",
    ]
    video = answer.split("m=audio")[0].split("m=video")[1]
    assert "a=mid:v0" in video and "a=inactive" in video
    assert "a=ice-ufrag:wxyz" in video  # our credentials, not the offer's
    assert "a=group:BUNDLE a1\r\n" in answer


def test_no_audio_section_is_refused() -> None:
    offer = JANUS_OFFER.split("m=audio", maxsplit=1)[0]
    with pytest.raises(UnsupportedOffer, match="no audio"):
        plan_offer(offer)


def test_audio_without_opus_is_refused() -> None:
    offer = JANUS_OFFER.replace("a=rtpmap:111 opus/48000/2\n", "")
    with pytest.raises(UnsupportedOffer, match="Opus"):
        plan_offer(offer)


def test_audio_section_already_rejected_is_not_usable() -> None:
    offer = JANUS_OFFER.replace("m=audio 9 ", "m=audio 0 ")
    with pytest.raises(UnsupportedOffer):
        plan_offer(offer)


def test_unsupported_offer_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        plan_offer("not sdp at all")


@settings(max_examples=300)
@given(st.text(max_size=400))
def test_arbitrary_text_is_an_unsupported_offer_or_a_plan(text: str) -> None:
    for candidate in (text, "v=0\n" + text, "v=0\nm=audio 9 X 1\na=rtpmap:1 opus/48000\n" + text):
        try:
            plan = plan_offer(candidate)
        except UnsupportedOffer:
            continue
        assert plan.offer.count("m=audio") == 1
