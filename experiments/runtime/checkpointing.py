"""Checkpoints of a train state plus JSON metadata, with Orbax's CheckpointManager.

Each checkpoint `DIR/<step>/` holds two items: `state` (any pytree of arrays: params,
optimizer state, loss scale, averages) and `meta` (a JSON dict: data position, counters).
Orbax writes a checkpoint into a temporary folder and renames it when complete, so a process
killed at any moment, during a save too, leaves only whole checkpoints behind (the
half-written temporary folder is ignored and removed on the next start).

Restoring takes the target's abstract state (`jax.ShapeDtypeStruct`s with shardings), so a
checkpoint saved on one mesh restores onto any other. `restore_newest` falls back past
checkpoints that cannot be restored (a damaged or missing file) to the newest one that can.

Saving runs in the background; a failed save (a full disk) raises `SaveError` naming the
step at the next `poll`, `save` or `close` — `poll` once per step to learn of it at once.
"""
import contextlib
import glob
import logging as std_logging
import os
import shutil

import orbax.checkpoint as ocp

ITEMS = ("state", "meta")


class SaveError(OSError):
    """Saving a checkpoint failed; the message names its step and the last good one."""


class RestoreError(ValueError):
    """No checkpoint in the folder can be restored."""


class Checkpoints:
    """The checkpoints in one folder: save, list, restore, delete.

    Args:
      directory: where the checkpoints live (created if needed).
      keep: how many of the most recent checkpoints to keep.
      read_only: only list and read (no folder created, no leftovers cleaned up): for
        looking into a folder another process may be writing.
    """

    def __init__(self, directory, keep=3, read_only=False):
        # Orbax wants an absolute path; a workdir is often given relative to the cwd.
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if read_only else keep, cleanup_tmp_directories=not read_only,
            create=not read_only, read_only=read_only,
            save_interval_steps=0 if read_only else 1)
        with _quiet() if read_only else contextlib.nullcontext():
            self._manager = ocp.CheckpointManager(self.directory, options=options,
                                                  item_names=ITEMS)
        self._pending = None  # the step being saved in the background
        # Orbax removes a killed save's leftovers in a background thread it waits for only
        # at the first save: a run that stops before one (a bad init_from) would leave the
        # thread running into interpreter shutdown ("cannot schedule new futures after
        # interpreter shutdown", a 43-line traceback after the run's one line). Wait now.
        cleanup = getattr(self._manager, "_maybe_await_cleanup_tmp_directory", None)
        if cleanup is not None:
            cleanup()

    def steps(self):
        """The steps of the complete checkpoints, ascending."""
        return sorted(self._manager.all_steps())

    def latest_step(self):
        """The latest complete checkpoint's step, or None."""
        return self._manager.latest_step()

    def save(self, step, state, meta):
        """Starts saving `state` and `meta` as checkpoint `step` (finished in the background).

        The arrays are copied off the devices before this returns, so the caller may donate
        `state` to the next train step. A step that already has a checkpoint is left as is.
        """
        if step in self._manager.all_steps():
            return
        self._check_pending(wait=True)
        self._pending = step
        try:
            self._write(step, state, meta)
        except OSError as error:
            self._fail(step, error)

    def _write(self, step, state, meta):
        """Starts Orbax's save (the seam tests patch to fail as a full disk would)."""
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))

    def poll(self):
        """Raises SaveError if the background save finished and failed (never blocks)."""
        self._check_pending(wait=False)

    def _check_pending(self, wait):
        if self._pending is None:
            return
        if not wait and self._manager.is_saving_in_progress():
            return
        try:
            if wait:
                self._manager.wait_until_finished()
            self._manager.check_for_errors()
        except Exception as error:  # noqa: BLE001 - whatever the background write raised
            self._fail(self._pending, error)
        self._pending = None

    def _fail(self, step, error):
        """Removes what the failed save left behind; raises SaveError naming the step."""
        self._pending = None
        for leftover in glob.glob(os.path.join(self.directory, f"{step}.orbax-checkpoint-tmp*")):
            shutil.rmtree(leftover, ignore_errors=True)
        good = [s for s in self.steps() if s != step]
        last = f"checkpoint {good[-1]} is the last good one" if good else "no checkpoint saved"
        why = getattr(error, "strerror", None) or error
        raise SaveError(f"saving checkpoint {step} failed: {why}; {last}") from error

    def restore(self, step, abstract_state):
        """`(state, meta)` of checkpoint `step`, laid out as `abstract_state`'s shardings."""
        self._manager.wait_until_finished()
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        except Exception:
            _hush_failed_reads()
            raise
        return restored.state, restored.meta

    def restore_newest(self, abstract_state, check_meta=None, warn=print,
                       start_over=False):
        """`(state, meta)` of the newest checkpoint that can be restored, or None if there is
        no checkpoint. Newer ones that cannot be restored are reported through `warn` (one
        line each, naming the step and why) and deleted, so the run saves them anew.

        Args:
          abstract_state: the target layout (see `restore`).
          check_meta: `meta -> None`, called before the arrays are read; what it raises (a
            checkpoint of another run) propagates instead of falling back.
          warn: called with a one-line message for each checkpoint skipped.
          start_over: when none can be restored, delete them all and return None (the
            caller starts from the beginning: a race's group of runs), instead of raising.

        Raises:
          RestoreError: when there are checkpoints but none can be restored (and not
            `start_over`).
        """
        steps = self.steps()
        failures = []
        for i, step in reversed(list(enumerate(steps))):
            then = ("trying the one before" if i else
                    "starting from the beginning" if start_over else "none is left")
            try:
                meta = self.read_meta(step)
            except Exception as error:  # noqa: BLE001 - a damaged file, whatever it raises
                failures.append((step, error))
                warn(f"checkpoint {step} cannot be restored ({reason(error)}); {then}")
                continue
            if check_meta is not None:
                check_meta(meta)
            try:
                restored = self.restore(step, abstract_state)
            except Exception as error:  # noqa: BLE001
                failures.append((step, error))
                warn(f"checkpoint {step} cannot be restored ({reason(error)}); {then}")
                continue
            self.delete_after(step)
            return restored
        if failures and start_over:
            self.delete_after(-1)
        elif failures:
            raise RestoreError(f"no checkpoint in {self.directory} can be restored "
                               f"(newest: {failures[0][0]}, {reason(failures[0][1])})")
        return None

    def read_meta(self, step):
        """The JSON metadata of checkpoint `step`, without reading its arrays."""
        return self._manager.restore(
            step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

    def delete_after(self, step):
        """Deletes every checkpoint later than `step` (e.g. ones saved during a loss spike)."""
        self._manager.wait_until_finished()
        for later in self.steps():
            if later > step:
                self._manager.delete(later)

    def close(self):
        """Waits for pending saves (SaveError if one failed) and releases the manager."""
        if self._manager is None:
            return
        try:
            self._check_pending(wait=True)
        finally:
            self._manager.close()
            self._manager = None


class _FailedReadFilter(std_logging.Filter):
    """Drops asyncio's "... exception was never retrieved" reports of Orbax's array reads.
    Reading a damaged checkpoint fails in several of Orbax's parallel read tasks; the first
    failure is raised (and reported in one line), the others are left to the garbage
    collector, which logs each with a 60-line spec of the array, at any later moment
    (often as the process exits, after its last line). asyncio words it after what was
    dropped: a Task, a Future (TensorStore's read) or a _GatheringFuture (Orbax's gather of
    an array's reads); a report is Orbax's when its message or its traceback names Orbax
    or TensorStore."""

    def filter(self, record):
        message = record.getMessage()
        return not ("exception was never retrieved" in message
                    and _from_orbax_read(message, record.exc_info))


def _from_orbax_read(message, exc_info) -> bool:
    if any(name in message for name in ("orbax", "OCDBT", "TensorStore")):
        return True
    frame = exc_info[2] if exc_info else None
    while frame is not None:
        if "orbax" in frame.tb_frame.f_code.co_filename:
            return True
        frame = frame.tb_next
    return False


def _hush_failed_reads():
    logger = std_logging.getLogger("asyncio")
    if not any(isinstance(f, _FailedReadFilter) for f in logger.filters):
        logger.addFilter(_FailedReadFilter())


@contextlib.contextmanager
def _quiet():
    """Silences Orbax's warnings that a read-only manager is read-only (it says so for every
    option it turns off, and for the folder)."""
    previous = std_logging.root.manager.disable
    std_logging.disable(std_logging.WARNING)
    try:
        yield
    finally:
        std_logging.disable(previous)


def reason(error):
    """Why a restore failed, in one short line: the last line of the message of the error's
    root cause (Orbax wraps TensorStore's "Truncated Zstd-compressed stream" in an error
    whose message is a many-line spec of the array)."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = str(error).strip().splitlines() or [type(error).__name__]
    text = f"{type(error).__name__}: {lines[-1].strip()}"
    return text if len(text) <= 200 else text[:197] + "..."
