"""The README's run command (``live-transcription demo``) shows captions from
real speech: every bundled speaker's words arrive as partials, then a final."""

from __future__ import annotations

import io
import re

import pytest

from live_transcription.sim.demo import run_demo

pytestmark = pytest.mark.e2e


async def test_demo_prints_live_captions_of_every_speaker(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("LT_STT_ENGINE", "MODAL_WORKSPACE", "MODAL_KEY", "MODAL_SECRET", "LT_MODAL_URL"):
        monkeypatch.delenv(name, raising=False)
    out = io.StringIO()
    result = await run_demo(out=out, tail_seconds=4.0)
    printed = out.getvalue()
    assert "engine embedded" in printed
    assert "Alice: " in printed and "Bob: " in printed
    alice = " ".join(result.finals("speaker-1")).lower()
    bob = " ".join(result.finals("speaker-2")).lower()
    assert {"quick", "lazy", "dog", "report", "friday"} <= set(re.findall(r"[a-z]+", alice))
    assert {"morning", "meeting", "minutes", "call"} <= set(re.findall(r"[a-z]+", bob))
    for speaker in ("speaker-1", "speaker-2"):
        mine = [c for c in result.captions if c.speaker == speaker]
        assert not mine[0].final and mine[-1].final
    assert "no STUN/TURN" not in printed
    assert "live translation: off" in printed and result.translations == []


async def test_demo_shows_a_viewer_reading_a_translation(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("LT_STT_ENGINE", "MODAL_WORKSPACE", "MODAL_KEY", "MODAL_SECRET", "LT_MODAL_URL"):
        monkeypatch.delenv(name, raising=False)
    for name in ("NEXTCLOUD_URL", "APP_SECRET"):
        monkeypatch.delenv(name, raising=False)
    out = io.StringIO()
    result = await run_demo(out=out, tail_seconds=4.0, translate_to="fr")
    printed = out.getvalue()
    assert "STAND-IN provider" in printed  # never passed off as a real translation
    originals = result.finals()
    assert len(result.translations) == len(originals) >= 2
    assert sorted(c.text for c in result.translations) == sorted(f"[fr] {text}" for text in originals)
    assert "->fr Alice: [fr] " in printed
