"""A `jax.profiler` trace of chosen train steps: `--config.profile_steps=START,COUNT`.

    profiler = Profiler("10,3", workdir)       # steps 10, 11 and 12
    for step in range(1, steps + 1):           # in a StepTraceAnnotation("train", step_num=step)
        state, metrics = profiler.run(step, train_step, state, batch)
    profiler.close()

The trace starts before step START and stops after step START + COUNT - 1 has finished on
the device; it lands in `workdir/plugins/profile/<timestamp>/` as `*.xplane.pb` (and a
Perfetto `*.trace.json.gz`), where TensorBoard's profile plugin (`pip install
tensorboard-plugin-profile`, then `tensorboard --logdir workdir`) and xprof find it.
Each step is a `jax.profiler.StepTraceAnnotation("train", step_num=step)`, so the trace
viewer and the overview page split the timeline by step. Only process 0 traces.

`check(profile_steps, workdir, steps)` runs before anything is written: a START past the
run's last step, or a file where the trace's folder goes (`workdir/plugins`), is a
`cli.UsageError` (one line); a range the run ends inside is traced up to its end, with one
warning line, and one a resumed run has passed already is one warning line too.
"""
import os
import sys

import jax

from ravine.experiments.runtime import cli

PROFILE_DIR = os.path.join("plugins", "profile")


def parse_steps(spec):
    """`"START,COUNT"` -> (start, count); "" -> None. ValueError naming the bad value."""
    if not spec:
        return None
    parts = str(spec).split(",")
    try:
        start, count = (int(part) for part in parts)
    except ValueError:
        raise ValueError(f"config.profile_steps must be START,COUNT (two integers, e.g. "
                         f"10,3), got {spec!r}") from None
    if start < 1 or count < 1:
        raise ValueError(f"config.profile_steps={spec!r}: START (a step, counted from 1) and "
                         "COUNT must be >= 1")
    return start, count


def check(spec, workdir, steps):
    """Before training: `cli.UsageError` (one line) when `profile_steps` cannot give a trace in
    `workdir` for a run of `steps` steps (see the module docstring); a warning line when
    it gives only part of the range."""
    parsed = parse_steps(spec)
    if parsed is None:
        return
    start, count = parsed
    if start > steps:
        raise cli.UsageError(f"config.profile_steps={spec!r}: START {start} is past the "
                             f"run's last step ({steps}); no trace would be written")
    folder = workdir
    for part in PROFILE_DIR.split(os.sep):
        folder = os.path.join(folder, part)
        if os.path.exists(folder) and not os.path.isdir(folder):
            raise cli.UsageError(f"config.profile_steps={spec!r}: the trace goes under "
                                 f"{os.path.join(workdir, PROFILE_DIR)!r}, but {folder!r} "
                                 "is a file; move it, or use another --workdir")
    if start + count - 1 > steps:
        _warn(f"config.profile_steps={spec!r}: the run ends at step {steps}, so the trace "
              f"covers steps {start}-{steps} only")


def _warn(message):
    print(f"warning: {message}", file=sys.stderr, flush=True)


class Profiler:
    """Traces steps [START, START + COUNT) of `profile_steps` into `workdir` (see above)."""

    def __init__(self, profile_steps, workdir, enabled=True):
        parsed = parse_steps(profile_steps)
        self.start, self.count = parsed or (0, 0)
        self.enabled = enabled and parsed is not None
        self.directory = workdir  # jax writes under <dir>/plugins/profile/<run>
        self.active = False

    def warn_if_done(self, step):
        """One warning line when a run resuming after `step` has passed the range."""
        if self.enabled and self.start + self.count - 1 <= step:
            _warn(f"config.profile_steps: steps {self.start}-{self.start + self.count - 1} "
                  f"ran before this resume from step {step}; no trace is written")

    def run(self, step, function, *args):
        """`function(*args)` as step `step` (counted from 1); inside the range it runs in a
        StepTraceAnnotation and is waited for, so its device work falls inside its span."""
        if not (self.enabled and self.start <= step < self.start + self.count):
            return function(*args)
        if not self.active:
            jax.profiler.start_trace(self.directory)
            self.active = True
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
            result = jax.block_until_ready(function(*args))
        if step == self.start + self.count - 1:
            self.close()
        return result

    def close(self):
        """Stops a trace still running (a run that ended inside the range)."""
        if self.active:
            self.active = False
            jax.profiler.stop_trace()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
