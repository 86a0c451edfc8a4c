"""Stopping a run cleanly: SIGTERM (a scheduler's preemption notice) and SIGINT (Ctrl-C).

    stop = preemption.StopSignal()
    with stop.installed():              # in the main thread of a standalone run only
        for step in ...:
            train_step(...)
            if stop.reached(step):      # after a signal: finish this step, save, exit
                save(step); break

On one process, the first signal only sets a flag; the loop finishes the step it is in,
saves and stops. A second signal aborts at once: `StopSignal(exit_now=...)` calls
`exit_now(name)` (the train job's prints one line and ends the process with `os._exit`,
as a SIGKILL would, so nothing unwinds through a compilation or Orbax's threads; the
interpreter crashed doing that), otherwise it raises KeyboardInterrupt. Any later signal
is ignored (recorded in `second`). On several processes
every process must stop at the same step: no handler is installed and `reached` is JAX's
preemption sync point (`jax.experimental.multihost_utils.reached_preemption_sync_point`),
which the coordination service (started by `jax.distributed.initialize()`) triggers on all
processes when any receives SIGTERM.
"""
import contextlib
import signal

import jax
from jax.experimental import multihost_utils

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopSignal:
    """Whether a stop was asked for, and by which signal (`name`, e.g. "SIGTERM")."""

    def __init__(self, exit_now=None):
        """`exit_now`: `signal name -> None`, called on a second signal (it should end the
        process); None raises KeyboardInterrupt instead."""
        self.name = None
        self.second = None  # the signal that asked to stop at once
        self.exit_now = exit_now

    def _handle(self, signum, frame):
        del frame
        name = signal.Signals(signum).name
        if self.name is None:  # the first: finish the step, save, stop
            self.name = name
            return
        if self.second is not None:  # a third or later: already on the way out
            return
        self.second = name  # a second signal: stop now, without saving
        if self.exit_now is not None:
            self.exit_now(name)
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def installed(self):
        """Handles SIGTERM and SIGINT inside the block; the old handlers afterwards. On
        several processes nothing is installed: JAX's coordination service listens for
        SIGTERM itself (a Python handler would replace its notifier)."""
        signals = SIGNALS if jax.process_count() == 1 else ()
        previous = {sig: signal.signal(sig, self._handle) for sig in signals}
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def reached(self, step):
        """Whether to stop after `step` (all processes agree on it)."""
        if jax.process_count() > 1:
            try:
                if multihost_utils.reached_preemption_sync_point(step):
                    self.name = self.name or "SIGTERM"
                    return True
            except RuntimeError:  # no preemption service (jax_enable_preemption_service)
                pass
            return False
        return self.name is not None


class NoStop:
    """A `StopSignal` that never fires (runs inside another program, e.g. a race)."""
    name = None

    def reached(self, step):
        del step
        return False
