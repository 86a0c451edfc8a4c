"""Which run a workdir holds: config.json, the checkpoint's identity, resume or branch.

A workdir holds one run (experiments/runtime/workdir.py has the rules): a resume is the
same run (a changed trajectory field, corpus, state signature or branch point is refused,
listing what changed), `config.init_from=DIR[:STEP]` starts a new run from another's
checkpoint. The branch point (`init_from`, `init_from_optimizer`) is part of the run's
identity, recorded in its checkpoints: resuming with another one is refused. Without STEP a
branch starts from DIR's newest checkpoint that restores (one warning line for each newer,
damaged one); a damaged STEP, or DIR with none that restores, exits 2 naming it.
"""
import dataclasses
import json
import os
import re
import sys

import jax
import ml_collections
from absl import logging

from ravine.experiments.runtime import builders, checkpointing, cli
from ravine.experiments.runtime import workdir as workdir_lib
from ravine.experiments.runtime.setup import state_layout

CONFIG_FILE, CHECKPOINT_DIR = "config.json", "checkpoints"


def config_record(config):
    """The config as plain JSON values (what a checkpoint stores and a resume compares)."""
    return json.loads(json.dumps(config.to_dict(), default=str))


def run_info(s):
    """config.json's content: the resolved config, the corpus, model and devices."""
    corpus = s.corpus
    return {
        "config": config_record(s.config),
        "corpus": {"path": corpus.path, "bytes": corpus.n_bytes, "sha256": corpus.sha256,
                   "documents": corpus.n_documents, "train_bytes": int(corpus.train.size),
                   "valid_bytes": int(corpus.valid.size)},
        "model": dataclasses.asdict(s.model_config), "params": s.n_params,
        "flops_per_token": s.flops_per_token, "mesh": dict(s.mesh.shape),
        "devices": jax.device_count(), "device_kind": jax.devices()[0].device_kind}


def parse_init_from(spec):
    """`(DIR, STEP or None)` of `config.init_from="DIR[:STEP]"` (DIR as written)."""
    match = re.fullmatch(r"(.*?)(?::(\d+))?", spec)
    return match.group(1), None if match.group(2) is None else int(match.group(2))


def _branch_point(spec):
    """What a resume compares of `init_from`: "" (none) or (normalized DIR, STEP)."""
    if not spec:
        return ""
    source, step = parse_init_from(spec)
    return os.path.normpath(source), step


def branch_changes(s, meta):
    """`[(field, recorded, now)]` where the branch point recorded in checkpoint `meta`
    differs from `s.config`'s (checkpoints from before it was recorded: not compared)."""
    changes = []
    if "init_from" in meta:
        recorded, now = meta["init_from"] or "", s.config.init_from or ""
        if _branch_point(recorded) != _branch_point(now):
            changes.append(("init_from", recorded, now))
        elif recorded and "init_from_optimizer" in meta and (
                bool(meta["init_from_optimizer"]) != bool(s.config.init_from_optimizer)):
            changes.append(("init_from_optimizer", meta["init_from_optimizer"],
                            s.config.init_from_optimizer))
    return changes


def check_same_run(s, workdir, meta):
    """ValueError when checkpoint `meta` is of another run than `s` (see workdir.py)."""
    record = config_record(s.config)
    changes = workdir_lib.changed_fields(meta["config"], record) if "config" in meta else []
    changes += branch_changes(s, meta)
    if meta.get("corpus_sha256", s.corpus.sha256) != s.corpus.sha256:
        changes.append((f"corpus (SHA-256 of {s.corpus.path!r}: its data changed)",
                        meta["corpus_sha256"][:12], s.corpus.sha256[:12]))
    if meta.get("signature") != s.signature:
        listed = "; changed: " + ", ".join(c[0] for c in changes) if changes else ""
        raise cli.UsageError(
            f"workdir {workdir!r} holds a checkpoint (step {meta.get('step')}) of a "
            f"different model / optimizer state{listed}; use a new --workdir or the "
            "original config")
    if changes:
        raise cli.UsageError(workdir_lib.describe_changes(workdir, changes))


def check_workdir(s, workdir):
    """Before anything is written: a checkpoint in `workdir` must be of the same run; with
    none, `config.init_from` must name a checkpoint (`branch_source`)."""
    folder = os.path.join(workdir, CHECKPOINT_DIR)
    if os.path.isdir(folder):
        checkpoints = checkpointing.Checkpoints(folder, read_only=True)
        try:
            steps = checkpoints.steps()
            for step in reversed(steps):
                try:
                    meta = checkpoints.read_meta(step)
                except Exception:  # noqa: BLE001 - damaged: restore falls back past it
                    continue
                check_same_run(s, workdir, meta)
                return
        finally:
            checkpoints.close()
        if steps:  # all damaged: the restore says so
            return
    if s.config.init_from:
        branch_source(s.config.init_from)


def _fresh(s):
    return s.init(jax.random.key(s.config.seed)), {
        "step": 0, "data_offset": 0, "rollbacks": 0, "spike": {}}


def branch_source(spec):
    """`(DIR, STEP or None, DIR's checkpoint steps)` of `config.init_from=spec`; UsageError
    (one line) when DIR is no run folder or has no checkpoint (STEP)."""
    source, step = parse_init_from(spec)
    if not os.path.isdir(source):
        head, colon, tail = spec.rpartition(":")
        if colon and os.path.isdir(head):
            raise cli.UsageError(f"config.init_from={spec!r}: STEP must be a checkpoint's "
                                 f"step (DIR:STEP, an integer), got {tail!r}")
        what = ("is a file, not a run's workdir" if os.path.exists(source)
                else "does not exist")
        raise cli.UsageError(f"config.init_from={spec!r}: {source!r} {what}")
    folder = os.path.join(source, CHECKPOINT_DIR)
    steps = []
    if os.path.isdir(folder):
        checkpoints = checkpointing.Checkpoints(folder, read_only=True)
        try:
            steps = checkpoints.steps()
        finally:
            checkpoints.close()
    if (step if step is not None else (steps[-1] if steps else None)) not in steps:
        raise cli.UsageError(f"config.init_from={spec!r}: no checkpoint"
                             f"{'' if step is None else f' {step}'} in {source!r} (it has "
                             f"{', '.join(map(str, steps)) or 'none'})")
    return source, step, steps


def branch_from(s, spec):
    """`(state, meta)` for `config.init_from=DIR[:STEP]` (see the module docstring)."""
    source, step, steps = branch_source(spec)
    candidates = [step] if step is not None else steps[::-1]
    checkpoints = checkpointing.Checkpoints(os.path.join(source, CHECKPOINT_DIR),
                                            read_only=True)
    skipped = []
    try:
        for at in candidates:
            try:
                branched = _branch_at(s, spec, source, checkpoints, at)
            except cli.UsageError:  # another model, another optimizer state: not damage
                raise
            except Exception as error:  # noqa: BLE001 - a damaged file, whatever it raises
                skipped.append((at, checkpointing.reason(error)))
                continue
            for bad, why in skipped:
                _warn(f"config.init_from={spec!r}: checkpoint {bad} of {source!r} cannot be "
                      f"restored ({why}); branching from the one before")
            return branched
    finally:
        checkpoints.close()
    if step is not None:
        raise cli.UsageError(f"config.init_from={spec!r}: checkpoint {step} of {source!r} "
                             f"cannot be restored ({skipped[0][1]})")
    raise cli.UsageError(f"config.init_from={spec!r}: no checkpoint of {source!r} can be "
                         f"restored (newest: {skipped[0][0]}, {skipped[0][1]})")


def _branch_at(s, spec, source, checkpoints, step):
    """`branch_from` at checkpoint `step` of `source` (raises what a damaged one raises)."""
    meta = checkpoints.read_meta(step)
    same = meta.get("signature") == s.signature
    if s.config.init_from_optimizer and not same:
        raise cli.UsageError(
            f"config.init_from_optimizer: the optimizer state of {spec!r} has another "
            "structure than this config's; branch with params only (init_from_optimizer=false)")
    if same:
        restored, _ = checkpoints.restore(step, s.abstract_state)
    else:  # another optimizer: lay the source's own state out on this mesh, keep its params
        record = meta.get("config")
        if record is None:  # a checkpoint from before configs were stored with it
            with open(os.path.join(source, CONFIG_FILE)) as f:
                record = json.load(f)["config"]
        source_config = ml_collections.ConfigDict(record)
        layout, _ = state_layout(builders.make_train_step(source_config), s.mesh,
                                 s.config.zero)
        restored, _ = checkpoints.restore(step, layout)
        want = jax.tree.map(lambda x: (x.shape, x.dtype), s.abstract_state.params)
        got = jax.tree.map(lambda x: (x.shape, x.dtype), restored.params)
        if want != got:
            raise cli.UsageError(f"config.init_from={spec!r}: its model has other "
                                 "parameters than this config's model")
    branch = {"init_from": spec, "init_from_optimizer": bool(s.config.init_from_optimizer)}
    if s.config.init_from_optimizer:
        return restored, {"step": int(meta["step"]), "data_offset": meta["data_offset"],
                          "rollbacks": 0, "spike": meta["spike"], **branch}
    state = s.init_from_params(restored.params)
    return state, {"step": 0, "data_offset": 0, "rollbacks": 0, "spike": {}, **branch}


def restore_or_start(s, checkpoints, workdir):
    """`(state, meta)`: the newest checkpoint in `workdir` that restores (of the same run),
    else the `init_from` branch, else the initial state."""
    restored = checkpoints.restore_newest(
        s.abstract_state, lambda meta: check_same_run(s, workdir, meta), _warn)
    if restored is not None:
        if restored[1]["step"]:
            logging.warning("resuming %s from step %d", workdir, restored[1]["step"])
        return restored
    if s.config.init_from:
        return branch_from(s, s.config.init_from)
    return _fresh(s)


def _warn(message):
    print(f"warning: {message}", file=sys.stderr, flush=True)


