"""Loss-spike detection for PaLM-style rollback (Chowdhery et al., 2022, "PaLM", Sec. 5.1:
restart from a checkpoint before the spike and skip the batches seen around it).

A step's training loss is a spike when it is not finite or exceeds `factor` times the
median of the last `window` non-spike losses (only once that many have been seen). A
rollback is due after `patience` consecutive spikes. The monitor is plain host state that
round-trips through a checkpoint's JSON metadata, so a resumed run decides exactly as the
uninterrupted one would have.
"""
import dataclasses
import math
import statistics


@dataclasses.dataclass
class SpikeMonitor:
    """Running median of recent losses and the current streak of spikes.

    Attributes:
      factor: a loss above factor x median is a spike (> 1).
      window: number of recent non-spike losses in the median (>= 1).
      patience: consecutive spikes that call for a rollback (>= 1).
      recent: the last `window` non-spike losses, oldest first.
      streak: consecutive spikes so far.
      first: update index of the streak's first spike (-1 when there is no streak); a
        checkpoint at a step <= first holds params from before the spike.
      last: the loss observed last (for messages; not part of `state()`).
    """
    factor: float
    window: int
    patience: int
    recent: list = dataclasses.field(default_factory=list)
    streak: int = 0
    first: int = -1
    last: float = math.nan

    def is_spike(self, loss):
        if not math.isfinite(loss):
            return True
        return (len(self.recent) == self.window
                and loss > self.factor * statistics.median(self.recent))

    def observe(self, index, loss):
        """Records the loss of update `index`; True when a rollback is due."""
        self.last = loss
        if self.is_spike(loss):
            self.first = index if self.streak == 0 else self.first
            self.streak += 1
            return self.streak >= self.patience
        self.recent = (self.recent + [loss])[-self.window:]
        self.streak, self.first = 0, -1
        return False

    def state(self):
        """The JSON-serialisable state (for a checkpoint's metadata)."""
        return {"recent": list(self.recent), "streak": self.streak, "first": self.first}

    def load(self, state):
        """Restores `state()` output; an empty dict resets to no history."""
        self.recent = list(state.get("recent", []))
        self.streak = state.get("streak", 0)
        self.first = state.get("first", -1)
