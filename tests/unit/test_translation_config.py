"""Live translation's settings: what it needs, and its bounds checked at start."""

from __future__ import annotations

import pytest

from live_transcription.config import ConfigError, load_settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "NEXTCLOUD_URL",
        "APP_SECRET",
        "LT_STT_ENGINE",
        "MODAL_WORKSPACE",
        "MODAL_KEY",
        "MODAL_SECRET",
    ):
        monkeypatch.delenv(name, raising=False)


def test_translation_needs_nextcloud_and_the_app_secret() -> None:
    assert load_settings().missing_for_translation() == ["NEXTCLOUD_URL", "APP_SECRET"]
    settings = load_settings(NEXTCLOUD_URL="https://cloud.example/", APP_SECRET="s")
    assert settings.missing_for_translation() == []
    assert settings.translation_timeout_seconds == 15.0
    assert settings.translation_max_tasks == 16 and settings.translation_max_tasks_per_room == 8


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("LT_TRANSLATION_TIMEOUT_SECONDS", "0"),
        ("LT_TRANSLATION_LANGUAGES_TTL_SECONDS", "-1"),
        ("LT_TRANSLATION_MAX_TASKS", "0"),
        ("LT_TRANSLATION_MAX_TASKS_PER_ROOM", "many"),
    ],
)
def test_bad_translation_bounds_stop_the_service_with_the_variable_named(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=name):
        load_settings()
