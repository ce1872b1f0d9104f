"""Nextcloud's Task Processing OCS API (consumer routes) for tests: the
service's own stand-in server, ``live_transcription.sim.taskprocessing``,
which the demo also uses. See its docstring for the answers and knobs."""

from live_transcription.sim.taskprocessing import (
    BASE,
    TASK_TYPE,
    FakeTask,
    FakeTaskProcessing,
    stand_in_translation,
)

__all__ = ["BASE", "TASK_TYPE", "FakeTask", "FakeTaskProcessing", "stand_in_translation"]
