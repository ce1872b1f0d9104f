"""The Janus WebSocket client and the private Janus process: pure protocol
helpers, then behaviour against a real Janus."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
import websockets
from hypothesis import given
from hypothesis import strategies as st

import tests.janus_support as support
from live_transcription.sim.janus import (
    JanusClient,
    JanusClosed,
    JanusError,
    build_request,
    completes,
    parse_message,
    plugin_result,
    success_id,
)
from live_transcription.sim.janus_process import (
    VIDEOROOM_LIBRARY,
    WEBSOCKETS_LIBRARY,
    JanusConfig,
    JanusInstallation,
    JanusNotInstalled,
    JanusProcess,
    find_janus,
    write_config_dir,
)
from live_transcription.sim.publisher import FRAME_SAMPLES, frame_at
from tests.janus_support import janus_fixture  # noqa: F401 (fixture)
from tests.waiting import until

# ---------------------------------------------------------------- pure part


def test_build_request_carries_ids_and_drops_absent_fields() -> None:
    msg = build_request("message", "t1", session_id=5, handle_id=7, body={"a": 1}, jsep=None)
    assert msg == {"janus": "message", "transaction": "t1", "session_id": 5, "handle_id": 7, "body": {"a": 1}}
    assert build_request("create", "t2") == {"janus": "create", "transaction": "t2"}


@pytest.mark.parametrize("frame", ["", "not json", "[]", '{"janus": 3}', '{"x": "y"}', b"\xff\xfe"])
def test_parse_message_rejects_what_is_not_a_janus_message(frame: str | bytes) -> None:
    assert parse_message(frame) is None


@given(st.text() | st.binary())
def test_parse_message_never_raises(frame: str | bytes) -> None:
    parse_message(frame)


def test_parse_message_types_the_routing_fields() -> None:
    msg = parse_message(json.dumps({"janus": "webrtcup", "session_id": 1, "sender": 2, "transaction": None}))
    assert msg is not None
    assert (msg.kind, msg.session_id, msg.sender, msg.transaction) == ("webrtcup", 1, 2, None)


def _event(data: dict[str, object], kind: str = "event") -> dict[str, object]:
    return {"janus": kind, "transaction": "t", "plugindata": {"plugin": "p", "data": data}}


def test_plugin_result_returns_data_and_raises_plugin_and_core_errors() -> None:
    ok = parse_message(json.dumps(_event({"videoroom": "joined", "id": 9})))
    assert ok is not None
    assert plugin_result(ok) == {"videoroom": "joined", "id": 9}
    bad = parse_message(json.dumps(_event({"videoroom": "event", "error_code": 428, "error": "no"})))
    assert bad is not None
    with pytest.raises(JanusError) as plugin_err:
        plugin_result(bad)
    assert plugin_err.value.code == 428
    core = parse_message('{"janus": "error", "error": {"code": 458, "reason": "No such session"}}')
    assert core is not None
    with pytest.raises(JanusError) as core_err:
        plugin_result(core)
    assert core_err.value.code == 458


def test_success_id_reads_data_id() -> None:
    ok = parse_message('{"janus": "success", "transaction": "t", "data": {"id": 42}}')
    assert ok is not None
    assert success_id(ok) == 42
    ack = parse_message('{"janus": "ack", "transaction": "t"}')
    assert ack is not None
    with pytest.raises(JanusError):
        success_id(ack)


def test_an_ack_completes_only_requests_that_wait_for_one() -> None:
    ack = parse_message('{"janus": "ack", "transaction": "t"}')
    event = parse_message(json.dumps(_event({"videoroom": "event"})))
    assert ack is not None and event is not None
    assert completes(ack, "ack")
    assert not completes(ack, "result")
    assert completes(event, "result")


def test_frame_schedule_silence_then_file_then_silence() -> None:
    pcm = np.arange(1, 2 * FRAME_SAMPLES + 101, dtype=np.int16)  # two frames + 100
    assert not frame_at(pcm, 0, content_start=None, loop=False).any()
    assert not frame_at(pcm, 1, content_start=2, loop=False).any()
    assert list(frame_at(pcm, 2, content_start=2, loop=False)[:2]) == [1, 2]
    tail = frame_at(pcm, 4, content_start=2, loop=False)
    assert tail[99] == pcm[-1]
    assert not tail[100:].any()
    assert not frame_at(pcm, 5, content_start=2, loop=False).any()
    wrapped = frame_at(pcm, 4, content_start=2, loop=True)
    assert wrapped[99] == pcm[-1]
    assert list(wrapped[100:102]) == [1, 2]
    assert all(len(frame_at(pcm, i, content_start=0, loop=True)) == FRAME_SAMPLES for i in range(9))


def test_find_janus_names_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(JanusNotInstalled, match="binary"):
        find_janus(binary=tmp_path / "janus")
    fake = tmp_path / "janus"
    fake.write_text("")
    with pytest.raises(JanusNotInstalled, match="libjanus_videoroom"):
        find_janus(binary=fake, module_dirs=(tmp_path,))


def test_config_dir_holds_only_videoroom_websockets_and_ecdsa(tmp_path: Path) -> None:
    modules = tmp_path / "modules"
    for sub, name in (("plugins", VIDEOROOM_LIBRARY), ("transports", WEBSOCKETS_LIBRARY)):
        (modules / sub).mkdir(parents=True)
        (modules / sub / name).write_text("")
        (modules / sub / "libjanus_other.so").write_text("")
    install = JanusInstallation(tmp_path / "janus", modules / "plugins", modules / "transports")
    root = tmp_path / "cfg"
    root.mkdir()

    main = write_config_dir(JanusConfig(ws_port=12345), root, install)

    assert [p.name for p in (root / "plugins").iterdir()] == [VIDEOROOM_LIBRARY]
    assert [p.name for p in (root / "transports").iterdir()] == [WEBSOCKETS_LIBRARY]
    core = main.read_text()
    assert "rsa_private_key = false" in core
    assert "cert_pem =" not in core
    ws = (root / "janus.transport.websockets.jcfg").read_text()
    assert 'ws_ip = "127.0.0.1"' in ws
    assert "ws_port = 12345" in ws
    assert "admin_ws = false" in ws


def test_missing_janus_skips_loudly(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(support, "janus_available", lambda: "janus is not here")
    with pytest.raises(pytest.skip.Exception, match="JANUS TESTS SKIPPED: janus is not here"):
        support.skip_unless_janus()
    assert "JANUS TESTS SKIPPED" in capsys.readouterr().err


# ------------------------------------------------------------- real Janus


@pytest.mark.janus
async def test_private_janus_loads_only_videoroom_and_websockets(janus: JanusProcess) -> None:
    async with websockets.connect(
        janus.ws_url, subprotocols=[websockets.Subprotocol("janus-protocol")]
    ) as ws:
        await ws.send(json.dumps({"janus": "info", "transaction": "i"}))
        info = json.loads(await ws.recv())
    assert info["janus"] == "server_info"
    assert list(info["plugins"]) == ["janus.plugin.videoroom"]
    assert list(info["transports"]) == ["janus.transport.websockets"]
    assert janus.log_path.exists()


@pytest.mark.janus
async def test_two_private_instances_run_side_by_side() -> None:
    async with support.running_janus() as first, support.running_janus() as second:
        assert first.ws_port != second.ws_port
        async with JanusClient(first.ws_url) as a, JanusClient(second.ws_url) as b:
            assert a.session_id and b.session_id
    assert not first.running and not second.running
    assert first.root is not None and not first.root.exists()


@pytest.mark.janus
async def test_keepalives_are_acked_and_the_tasks_end_with_the_client(janus: JanusProcess) -> None:
    def client_tasks() -> list[str]:
        return [t.get_name() for t in asyncio.all_tasks() if t.get_name().startswith("janus-")]

    async with JanusClient(janus.ws_url, keepalive_interval_s=0.05) as client:
        await until(lambda: client.keepalives_acked >= 3, 30.0, "no keepalive was acked")
        assert sorted(client_tasks()) == ["janus-keepalive", "janus-reader"]

    assert client_tasks() == []
    assert client.closed.is_set()


@pytest.mark.janus
async def test_janus_going_away_closes_the_client(janus: JanusProcess) -> None:
    async with JanusClient(janus.ws_url) as client:
        handle = await client.attach()

        await janus.stop()

        await support.wait_closed(client)
        with pytest.raises(JanusClosed):
            await handle.message({"request": "list"})
    assert client.closed.is_set()


@pytest.mark.janus
async def test_plugin_errors_are_raised_as_janus_errors(janus: JanusProcess) -> None:
    async with JanusClient(janus.ws_url) as client:
        handle = await client.attach()
        with pytest.raises(JanusError) as err:
            await handle.message({"request": "listparticipants", "room": 424242})
        assert err.value.code == 426  # JANUS_VIDEOROOM_ERROR_NO_SUCH_ROOM
        rooms = await handle.message({"request": "list"})
        assert rooms.data["videoroom"] == "success"
