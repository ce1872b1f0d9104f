"""Talk's room commands run on this process's rooms: the status and body Talk gets.

The HTTP routes turn a request into a ``Command``; in a single process it runs
here at once, in a cluster it runs here on the replica that owns the room
(``ClusterNode.submit``), which may have received it from another replica.
Either way the answer is the same ``Reply``.
"""

from __future__ import annotations

import logging

from live_transcription.cluster.codec import (
    Command,
    Leave,
    Reply,
    SetLanguage,
    SetTargetLanguage,
    Transcribe,
)
from live_transcription.hpb.failures import describe_failure
from live_transcription.logs import short_token
from live_transcription.rooms import ports
from live_transcription.rooms.manager import (
    CapacityReached,
    JoinCancelled,
    Manager,
    NoSuchRoom,
    NotCaptioned,
    ProviderFailure,
    UnsupportedLanguage,
)
from live_transcription.translation.translator import TranslationUnavailable

log = logging.getLogger(__name__)


def _message(text: str) -> Reply:
    return Reply(200, {"message": text})


async def run_command(manager: Manager, command: Command) -> Reply:
    try:
        match command:
            case Transcribe():
                return _message(
                    await manager.transcribe(
                        command.room,
                        command.session,
                        command.enable,
                        command.language,
                        translate_to=command.translate_to if command.enable else None,
                    )
                )
            case SetLanguage():
                await manager.set_language(command.room, command.language)
                return _message(f"language set to {command.language}")
            case SetTargetLanguage():
                await manager.set_target_language(command.room, command.session, command.language)
                if command.language is None:
                    return _message("translation disabled for this session")
                return _message(f"translating into {command.language} for this session")
            case Leave():
                if not await manager.leave(command.room):
                    return Reply.error(404, "no active transcription in this room")
                return _message("leaving the call")
    except UnsupportedLanguage as exc:
        return Reply.error(400, str(exc))
    except NoSuchRoom as exc:
        return Reply.error(404, str(exc))
    except TranslationUnavailable as exc:
        return Reply.error(550, f"translation provider unavailable: {exc}")
    except NotCaptioned as exc:
        return Reply.error(412, str(exc))
    except ports.HpbUnavailable as exc:
        cause = describe_failure(exc)
        # the details (exception chain) for the operator, plain words for Talk;
        # grouped by cause, not room: a flood of enables is a few lines
        log.info(
            "enable refused in room %s: cannot reach the signaling server: %r",
            short_token(command.room),
            exc,
            extra={"cause": cause.kind},
        )
        return Reply.error(503, f"cannot reach the signaling server ({cause.words})")
    except (CapacityReached, JoinCancelled) as exc:
        return Reply.error(503, str(exc))
    except ProviderFailure as exc:
        return Reply.error(550, f"speech-to-text provider failure: {exc}")
    raise AssertionError(f"unknown command {command!r}")  # pragma: no cover - the match is exhaustive
