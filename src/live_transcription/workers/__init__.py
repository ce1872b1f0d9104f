"""Worker processes on one machine: a supervisor and the workers it runs.

One Python process is bound to one core. With ``LT_WORKERS`` > 1 (default:
the cores this process may use) ``live-transcription serve`` is a
supervisor: it owns the HTTP API, decides which worker runs each room
(least-loaded by speakers, sticky, a full worker is never chosen) and keeps
each room's record (targets, language). Each worker is today's single
process without the HTTP API (``service.running_service``), driven over a
Unix socket (``channel``, ``protocol``). A worker that dies is started
again and its rooms are re-opened from their records on the workers
running (``pool``). ``supervisor`` is what the HTTP routes see; with
``LT_NATS_URL`` the pool is the cluster node's room host, so a supervisor is
one replica of the cluster.

Pure decisions: ``protocol`` (frames, messages), ``exposition`` (one
``/metrics`` from all), ``policy`` (cap shares, restart backoff), the
placement of ``cluster.placement``. I/O: ``channel``, ``worker`` (the
worker process), ``pool`` and ``supervisor``.
"""


class WorkersUnavailable(RuntimeError):
    """The worker processes could not be started."""
