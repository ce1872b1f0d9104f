"""Live translation of final captions through Nextcloud Task Processing.

``languages`` and ``ordering`` are pure; ``ocs`` is the HTTP client of the
Task Processing consumer API; ``translator`` owns the process-wide task
workers and the provider's state; ``room`` is one room's translation worker.
"""
