"""Stop requests: SIGTERM, which schedulers send before they pre-empt a job, ends it
cleanly at the next step boundary with a checkpoint, so a restart loses nothing."""

from __future__ import annotations

import signal


class StopRequest:
    """Remembers whether (and which) stop signal arrived; installs its handlers on creation.

    Workers must agree on the step at which they stop, or the others would wait in a
    collective forever: the loop adds up `stop.requested` over the processes every step
    (`Replicas.sum_over_processes`).
    """

    def __init__(self, signals=(signal.SIGTERM,)):
        self.signal_name: str | None = None
        self._previous = {s: signal.signal(s, self._handle) for s in signals}

    def _handle(self, signum, frame) -> None:
        self.signal_name = signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        """Puts back the handlers that were installed before."""
        for s, handler in self._previous.items():
            signal.signal(s, handler)
