"""The rules of a run folder: one run per workdir, and a resume is the same run.

- `lock(workdir)`: an exclusive `flock` on `workdir/lock`, taken by process 0 before the
  run writes anything and released by the kernel when the process ends however it ends
  (a SIGKILLed run leaves no stale lock). A second run on the same folder is refused
  with a message naming the holder's pid. The other processes of a multi-host run share
  the folder and take no lock.
- `changed_fields(saved, config)`: the fields of a resumed run's config that differ from
  the checkpoint's and would change the trajectory (everything but `RESUMABLE_FIELDS`,
  and `steps` while the schedule's length follows it). A run is branched instead with
  `--config.init_from=DIR[:STEP]` into a new folder.
"""
import contextlib
import errno
import fcntl
import os

from ravine.experiments.runtime import cli

LOCK_FILE = "lock"

# Fields that may change between a run and its resume: they do not change the trajectory
# (when to log, evaluate or save, how the state is laid out on devices, integrations).
RESUMABLE_FIELDS = frozenset({
    "log_every", "eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints",
    "mesh", "zero", "peak_flops", "corpus", "preempt_exit_code", "init_from",
    "init_from_optimizer", "profile_steps", "offload_optimizer_state", "offload",
    "microbatches",
    "wandb", "tensorboard", "layer_norms"})


class WorkdirBusy(cli.UsageError):
    """Another live process holds the workdir's lock."""


@contextlib.contextmanager
def lock(workdir, enabled=True):
    """Holds the run lock of `workdir` (created if needed) while the block runs.

    Args:
      workdir: the run folder.
      enabled: False on processes other than 0 of a multi-host run (no lock taken).

    Raises:
      WorkdirBusy: naming the pid of the process that holds the lock.
      cli.UsageError: when the folder cannot be created or written (a file, read-only, ...).
    """
    if not enabled:
        yield
        return
    path = os.path.join(workdir, LOCK_FILE)
    try:
        os.makedirs(workdir, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise cli.UsageError(f"--workdir {workdir!r} cannot be used: "
                             f"{error.strerror or error} ({error.filename or path})") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise WorkdirBusy(f"workdir {workdir!r} is in use by another run (pid {holder}); "
                              "one run per workdir: wait for it, stop it, or use another "
                              "--workdir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock (the kernel does the same if the process dies)


def flatten(tree, prefix=""):
    """{"optimizer.b1": 0.9, ...}: the leaves of a nested dict under dotted names."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def steps_may_change(config):
    """Whether `steps` can change on resume: the schedule's length does not follow it (a
    constant schedule, an explicit schedule.total_steps, or a schedule without one)."""
    schedule = config["schedule"]
    return (schedule.get("name") in ("constant", "inverse_sqrt", "cosine_restarts")
            or schedule.get("total_steps") is not None)


def changed_fields(saved, config):
    """`[(field, saved value, new value)]` for the trajectory fields that differ.

    Args:
      saved: the config dict (nested, as `ConfigDict.to_dict()`) stored with a checkpoint.
      config: the config dict of the run that resumes it.
    """
    old, new = flatten(saved), flatten(config)
    changes = []
    for name in sorted(set(old) | set(new)):
        if name.split(".")[0] in RESUMABLE_FIELDS:
            continue
        if name == "steps" and steps_may_change(saved) and steps_may_change(config):
            continue
        if old.get(name) != new.get(name):
            changes.append((name, old.get(name), new.get(name)))
    return changes


def describe_changes(workdir, changes):
    listed = ", ".join(f"{name} {before!r} -> {after!r}" for name, before, after in changes)
    return (f"workdir {workdir!r} holds a run with other settings ({listed}); a resume must "
            f"be the same run: use the original settings, a new --workdir, or "
            f"--config.init_from={workdir} with a new --workdir to branch from it")
