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
"""
import os

import jax

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


class Profiler:
    """Traces steps [START, START + COUNT) of `profile_steps` into `workdir` (see above)."""

    def __init__(self, profile_steps, workdir, enabled=True):
        parsed = parse_steps(profile_steps)
        self.start, self.count = parsed or (0, 0)
        self.enabled = enabled and parsed is not None
        self.directory = workdir  # jax writes under <dir>/plugins/profile/<run>
        self.active = False

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
