"""Which languages the installed Task Processing provider translates (pure).

The provider announces them as the ``core:text2text:translate`` task type's
``inputShapeEnumValues``: ``origin_language`` and ``target_language``, each a
list of ``{"name", "value"}``. No such task type means no provider.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from live_transcription.stt.base import Language

TASK_TYPE = "core:text2text:translate"
DETECT_LANGUAGE = "detect_language"
"""An origin id some providers offer: they find the source language themselves."""

_RTL = frozenset({"ar", "fa", "he", "ur", "ps", "yi", "dv", "ug", "sd", "ckb"})
_NO_SPACES = frozenset({"ja", "zh", "th", "lo", "km", "my", "bo"})


@dataclass(frozen=True, slots=True)
class TranslationLanguages:
    origin: Mapping[str, Language]
    target: Mapping[str, Language]

    def as_talk(self) -> dict[str, object]:
        """The object Talk reads: ``{"origin_languages": ..., "target_languages": ...}``."""
        return {
            "origin_languages": {code: lang.as_talk_entry() for code, lang in self.origin.items()},
            "target_languages": {code: lang.as_talk_entry() for code, lang in self.target.items()},
        }

    def origin_for(self, room_language: str) -> str | None:
        """The origin id to send for captions in ``room_language``: the language
        itself, else ``detect_language`` when offered, else None (cannot)."""
        if room_language in self.origin:
            return room_language
        if DETECT_LANGUAGE in self.origin:
            return DETECT_LANGUAGE
        return None


class NoTranslateTaskType(LookupError):
    """Nextcloud lists no ``core:text2text:translate`` task type: no provider."""


def _language(code: str, name: str) -> Language:
    base = code.split("-", maxsplit=1)[0].split("_", maxsplit=1)[0].lower()
    return Language(code, name or code, separator="" if base in _NO_SPACES else " ", rtl=base in _RTL)


def _enum(values: object) -> dict[str, Language]:
    found: dict[str, Language] = {}
    if not isinstance(values, list):
        return found
    for entry in values:
        if not isinstance(entry, dict):
            continue
        value, name = entry.get("value"), entry.get("name")
        if isinstance(value, str) and value:
            found[value] = _language(value, name if isinstance(name, str) else "")
    return found


def parse_task_types(data: object) -> TranslationLanguages:
    """The ``data`` of ``GET .../tasks_consumer/tasktypes`` -> the languages.

    Raises ``NoTranslateTaskType`` when the translate task type is absent or
    offers no target language (Talk refuses an empty target list), and
    ``ValueError`` when the answer is not the expected shape."""
    types = data.get("types") if isinstance(data, dict) else None
    if types == []:  # PHP encodes an empty array as a list: no task type at all
        types = {}
    if not isinstance(types, dict):
        raise ValueError("task types: no 'types' object")
    task_type = types.get(TASK_TYPE)
    if task_type is None:
        raise NoTranslateTaskType(f"no {TASK_TYPE} task type")
    if not isinstance(task_type, dict):
        raise ValueError(f"task types: {TASK_TYPE} is not an object")
    enums = task_type.get("inputShapeEnumValues")
    if not isinstance(enums, dict):  # PHP sends {} (an object) when empty, [] from older servers
        enums = {}
    origin = _enum(enums.get("origin_language"))
    target = _enum(enums.get("target_language"))
    if not origin or not target:
        raise NoTranslateTaskType(f"{TASK_TYPE} offers no origin or no target language")
    return TranslationLanguages(origin=origin, target=target)
