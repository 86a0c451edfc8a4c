r"""The train job with faults injected, for tests that need them in a real process.

    python -m tests.fault_train --fault=corrupt:9:3 <experiments.train flags>

Each `--fault=` patches one seam of the train job, then the job's own `main` runs:
  corrupt:FROM:COUNT    batches at data positions FROM .. FROM+COUNT-1 are random bytes
                        (a loss spike), through `runtime.loop.batch_at`
  kill_after_save:STEP  SIGKILL right after the checkpoint save of STEP has started
  save_error:STEP       saving checkpoint STEP raises OSError(ENOSPC) (a full disk)
  sigterm_at:STEP       the process sends itself SIGTERM while step STEP trains
The production config and loop know nothing of these.
"""
import errno
import os
import signal
import sys

import numpy as np


def corrupt(start, count):
    from ravine.experiments.runtime import loop
    batch_at = loop.batch_at

    def corrupted(s, position):
        batch = batch_at(s, position)
        if start <= position < start + count:
            rows = np.random.default_rng(position).integers(0, 256, batch.shape, np.uint8)
            return loop.sharding.shard_batch(rows, s.mesh, batch_dim=1)
        return batch

    loop.batch_at = corrupted


def on_save(step, action):
    from ravine.experiments.runtime import checkpointing
    write = checkpointing.Checkpoints._write

    def patched(self, at, state, meta):
        if at == step and action == "error":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        write(self, at, state, meta)
        if at == step and action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)

    checkpointing.Checkpoints._write = patched


def sigterm_at(step):
    from ravine.experiments.runtime import loop
    batch_at = loop.batch_at

    def batch_then_signal(s, position):
        if position == step - 1:  # the batch of update `step` (no data offset in tests)
            os.kill(os.getpid(), signal.SIGTERM)
        return batch_at(s, position)

    loop.batch_at = batch_then_signal


def main():
    faults = [arg for arg in sys.argv[1:] if arg.startswith("--fault=")]
    sys.argv = [sys.argv[0]] + [arg for arg in sys.argv[1:] if arg not in faults]
    for fault in faults:
        name, *args = fault.removeprefix("--fault=").split(":")
        args = [int(a) for a in args]
        if name == "corrupt":
            corrupt(*args)
        elif name == "kill_after_save":
            on_save(args[0], "kill")
        elif name == "save_error":
            on_save(args[0], "error")
        elif name == "sigterm_at":
            sigterm_at(args[0])
        else:
            raise SystemExit(f"unknown fault {fault}")
    from ravine.experiments import train
    train.run_script()


if __name__ == "__main__":
    main()
