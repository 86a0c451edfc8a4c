"""Which run a workdir holds: config.json, the checkpoint's identity, resume or branch.

A workdir holds one run (experiments/runtime/workdir.py has the rules): a resume is the
same run (a changed trajectory field, corpus or state signature is refused, listing what
changed), `config.init_from=DIR[:STEP]` starts a new run from another's checkpoint.
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


def check_same_run(s, workdir, meta):
    """ValueError when checkpoint `meta` is of another run than `s` (see workdir.py)."""
    record = config_record(s.config)
    changes = workdir_lib.changed_fields(meta["config"], record) if "config" in meta else []
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
    """Before anything is written: a checkpoint in `workdir` must be of the same run."""
    folder = os.path.join(workdir, CHECKPOINT_DIR)
    if not os.path.isdir(folder):
        return
    checkpoints = checkpointing.Checkpoints(folder, read_only=True)
    for step in reversed(checkpoints.steps()):
        try:
            meta = checkpoints.read_meta(step)
        except Exception:  # noqa: BLE001 - a damaged checkpoint: restore falls back past it
            continue
        check_same_run(s, workdir, meta)
        return


def _fresh(s):
    return s.init(jax.random.key(s.config.seed)), {
        "step": 0, "data_offset": 0, "rollbacks": 0, "spike": {}}


def branch_from(s, spec):
    """`(state, meta)` for `config.init_from=DIR[:STEP]` (see the module docstring)."""
    match = re.fullmatch(r"(.*?)(?::(\d+))?", spec)
    source, step = match.group(1), match.group(2)
    checkpoints = checkpointing.Checkpoints(os.path.join(source, CHECKPOINT_DIR),
                                            read_only=True)
    steps = checkpoints.steps() if os.path.isdir(checkpoints.directory) else []
    step = int(step) if step is not None else (steps[-1] if steps else None)
    if step is None or step not in steps:
        raise cli.UsageError(f"config.init_from={spec!r}: no checkpoint "
                             f"{'' if step is None else step} in {source!r} (it has "
                             f"{', '.join(map(str, steps)) or 'none'})")
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
    checkpoints.close()
    if s.config.init_from_optimizer:
        return restored, {"step": int(meta["step"]), "data_offset": meta["data_offset"],
                          "rollbacks": 0, "spike": meta["spike"], "init_from": spec}
    state = s.init_from_params(restored.params)
    return state, {"step": 0, "data_offset": 0, "rollbacks": 0, "spike": {},
                   "init_from": spec}


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


