"""Checkpoints of a train state plus JSON metadata, with Orbax's CheckpointManager.

Each checkpoint `DIR/<step>/` holds two items: `state` (any pytree of arrays: params,
optimizer state, loss scale, averages) and `meta` (a JSON dict: data position, counters).
Orbax writes a checkpoint into a temporary folder and renames it when complete, so a process
killed at any moment, during a save too, leaves only whole checkpoints behind (the
half-written temporary folder is ignored and removed on the next start).

Restoring takes the target's abstract state (`jax.ShapeDtypeStruct`s with shardings), so a
checkpoint saved on one mesh restores onto any other.
"""
import os

import orbax.checkpoint as ocp

ITEMS = ("state", "meta")


class Checkpoints:
    """The checkpoints in one folder: save, list, restore, delete.

    Args:
      directory: where the checkpoints live (created if needed).
      keep: how many of the most recent checkpoints to keep.
    """

    def __init__(self, directory, keep=3):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, cleanup_tmp_directories=True,
                                               create=True)
        # Orbax wants an absolute path; a workdir is often given relative to the cwd.
        self._manager = ocp.CheckpointManager(os.path.abspath(directory), options=options,
                                              item_names=ITEMS)

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
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))

    def restore(self, step, abstract_state):
        """`(state, meta)` of checkpoint `step`, laid out as `abstract_state`'s shardings."""
        self._manager.wait_until_finished()
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return restored.state, restored.meta

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
        """Waits for pending saves and releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()
