"""The HPB emulator itself: what tests and the demo rely on."""

from __future__ import annotations

import json

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from live_transcription.hpb import protocol
from live_transcription.sim.client import SimClient
from live_transcription.sim.emulator import HpbEmulator

ROOM = "room-e"


async def test_only_the_spreed_path_is_served(hpb: HpbEmulator) -> None:
    with pytest.raises(InvalidStatus):
        await connect(hpb.url.replace("/spreed", "/other"))


async def test_hello_first_then_welcome_is_skipped_and_errors_echo_ids(hpb: HpbEmulator) -> None:
    async with connect(hpb.url) as ws:
        assert isinstance(protocol.parse(await ws.recv()), protocol.Welcome)
        await ws.send(json.dumps({"type": "room", "id": "7", "room": {"roomid": ROOM}}))
        assert protocol.parse(await ws.recv()) == protocol.Error("7", "hello_expected", "say hello")
        await ws.send(protocol.encode(protocol.resume("8", "unknown")))
        reply = protocol.parse(await ws.recv())
        assert isinstance(reply, protocol.Error) and (reply.id, reply.code) == ("8", "no_such_session")


async def test_relay_fills_sender_and_requestoffer_without_bridge(hpb: HpbEmulator) -> None:
    async with (
        SimClient(hpb.url, ROOM, "nc-a", user_id="a") as a,
        SimClient(hpb.url, ROOM, "nc-b", user_id="b") as b,
    ):
        assert a._ws is not None
        hello = {"type": "hello-there", "n": 1}
        await a._ws.send(
            protocol.encode(
                {
                    "type": "message",
                    "id": "3",
                    "message": {"recipient": {"type": "session", "sessionid": b.session_id}, "data": hello},
                }
            )
        )
        await a._ws.send(protocol.encode(protocol.request_offer("4", b.session_id)))
        await a._ws.send(protocol.encode(protocol.request_offer("5", "nobody")))

        def relayed() -> list[protocol.Relayed]:
            return [e for e in b.events if isinstance(e, protocol.Relayed)]

        await b.wait_for(lambda: len(relayed()) == 2)
        assert relayed()[0] == protocol.Relayed(a.session_id, hello)
        assert relayed()[1].data == {"type": "requestoffer", "roomType": "video"}
        await a.wait_for(lambda: any(isinstance(e, protocol.Error) for e in a.events))
        errors = [e for e in a.events if isinstance(e, protocol.Error)]
        assert [(e.id, e.code) for e in errors] == [("5", "client_not_found")]
        assert [m["id"] for m in hpb.received(a.session_id)] == ["1", "2", "3", "4", "5"]


async def test_restart_keeps_the_port_and_forgets_sessions(hpb: HpbEmulator) -> None:
    port = hpb.port
    async with SimClient(hpb.url, ROOM, "nc-a") as a:
        await hpb.stop()
        assert hpb.open_connections == 0 and hpb.session(a.session_id) is None
        await hpb.start()
        assert hpb.port == port
        async with SimClient(hpb.url, ROOM, "nc-b") as b:
            assert hpb.sessions_in_room(ROOM) == [b.session_id]
