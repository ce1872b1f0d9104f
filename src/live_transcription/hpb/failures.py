"""Why the HPB could not be reached, in plain words (pure).

Error bodies, health reasons and the outage log line say *what* went wrong
(``connection refused``, ``timed out``); the exception's repr, with its
details, goes to the log only. ``cause.kind`` is a short, bounded label for
metrics.
"""

from __future__ import annotations

import socket
import ssl
from dataclasses import dataclass

from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

CAUSES = (
    "connection-refused",
    "timed-out",
    "host-not-found",
    "tls",
    "rejected",
    "refused-by-hpb",
    "connection-lost",
    "network",
    "other",
)
"""Every ``FailureCause.kind`` (metric label values)."""


@dataclass(frozen=True, slots=True)
class FailureCause:
    kind: str
    words: str


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in seen and len(seen) < 10:
        seen.append(current)
        current = current.__cause__ or current.__context__
    return seen


def describe_failure(exc: BaseException) -> FailureCause:
    """The innermost recognisable reason ``exc`` (an ``HpbUnavailable`` or what
    it wraps) happened."""
    for cause in reversed(_chain(exc)):
        match cause:
            case ConnectionRefusedError():
                return FailureCause("connection-refused", "connection refused")
            case TimeoutError():
                return FailureCause("timed-out", "timed out")
            case socket.gaierror():
                return FailureCause("host-not-found", "host name not found")
            case ssl.SSLCertVerificationError():
                return FailureCause("tls", "TLS certificate not trusted")
            case ssl.SSLError():
                return FailureCause("tls", "TLS error")
            case InvalidStatus():
                status = cause.response.status_code
                return FailureCause("rejected", f"the server answered HTTP {status}")
            case InvalidHandshake() | InvalidURI():
                return FailureCause("rejected", "WebSocket handshake rejected")
            case ConnectionClosed() | ConnectionResetError() | BrokenPipeError():
                return FailureCause("connection-lost", "connection lost")
            case OSError():
                words = (cause.strerror or "network error").lower()
                return FailureCause("network", words)
    text = str(exc)
    if "refused by the HPB" in text:
        # "<what> refused by the HPB: <code> <message>": the HPB's own words
        return FailureCause("refused-by-hpb", text)
    if "timed out" in text:
        return FailureCause("timed-out", "timed out")
    return FailureCause("other", text or type(exc).__name__)
