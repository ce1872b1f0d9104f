"""Why the HPB could not be reached, in plain words."""

from __future__ import annotations

import socket
import ssl

import pytest
from websockets.datastructures import Headers
from websockets.exceptions import InvalidStatus
from websockets.http11 import Response

from live_transcription.hpb.failures import CAUSES, describe_failure
from live_transcription.rooms.ports import HpbUnavailable


def wrapped(cause: BaseException, text: str = "cannot connect to the HPB") -> HpbUnavailable:
    try:
        raise HpbUnavailable(f"{text}: {cause!r}") from cause
    except HpbUnavailable as exc:
        return exc


@pytest.mark.parametrize(
    ("cause", "kind", "words"),
    [
        (ConnectionRefusedError(111, "Connection refused"), "connection-refused", "connection refused"),
        (TimeoutError(), "timed-out", "timed out"),
        (socket.gaierror(-2, "Name or service not known"), "host-not-found", "host name not found"),
        (ssl.SSLCertVerificationError("bad cert"), "tls", "TLS certificate not trusted"),
        (InvalidStatus(Response(403, "Forbidden", Headers())), "rejected", "the server answered HTTP 403"),
        (ConnectionResetError(104, "Connection reset by peer"), "connection-lost", "connection lost"),
        (OSError(113, "No route to host"), "network", "no route to host"),
    ],
)
def test_causes_in_plain_words(cause: BaseException, kind: str, words: str) -> None:
    described = describe_failure(wrapped(cause))
    assert (described.kind, described.words) == (kind, words)
    assert described.kind in CAUSES
    assert "Error" not in described.words and "(" not in described.words


def test_the_hpbs_own_refusal_and_timeouts_without_a_cause() -> None:
    refused = describe_failure(HpbUnavailable("hello refused by the HPB: invalid_secret bad secret"))
    assert refused.kind == "refused-by-hpb"
    assert refused.words == "hello refused by the HPB: invalid_secret bad secret"
    timeout = describe_failure(HpbUnavailable("timed out joining the call through the HPB"))
    assert (timeout.kind, timeout.words) == ("timed-out", "timed out")
    assert describe_failure(HpbUnavailable("")).kind == "other"
