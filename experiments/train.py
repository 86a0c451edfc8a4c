r"""Train a byte-level transformer LM from a config, resuming from DIR's latest checkpoint.

    python -m ravine.experiments.train --config=experiments/configs/lm.py:tiny --workdir=runs/tiny \
        --config.optimizer.name=lion --config.optimizer.learning_rate=3e-4

Writes DIR/metrics.jsonl (a row per logged step), DIR/config.json (the resolved config and
the corpus' size and hash), DIR/checkpoints/ (Orbax) and DIR/loss.png; a tqdm bar on stderr.
Bad flags or config values exit with status 2 and one line on stderr, before DIR is touched.
For emulated devices on CPU set `JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES=8`; on several hosts
set `--multihost` (calls `jax.distributed.initialize()`; each host reads its rows of a batch).

The workdir rules (experiments/workdir.py): one run per workdir (a second process exits 2
naming the first one's pid); a resume is the same run (trajectory fields changed since the
checkpoint exit 2, listing them); `--config.init_from=DIR[:STEP]` starts a new workdir
from another run's checkpoint (params; with `--config.init_from_optimizer=true` also the
optimizer state, step and data position). SIGTERM or Ctrl-C: the step finishes, a
checkpoint is saved, one line says where it stopped; exit `config.preempt_exit_code` (143).

In Python (e.g. experiments/race.py): `summary = train(lm.get_config("tiny"), workdir)`;
the pieces (`setup`, `experiments.builders`) are public for sweeps that drive steps
themselves.

Steps are counted from 1: the row with `step = s` has the loss of the s-th update (of the
params after s - 1 updates) and, on eval steps, the eval losses of the params after s
updates; the checkpoint at step s holds the state after s updates. The batch of update s
is batch number `s - 1 + data_offset` of the seekable sampler (`experiments.data`), where
`data_offset` grows by `spike_skip` at each spike rollback.
"""
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import re
import sys
from typing import Any

import jax
import ml_collections
import tqdm
from absl import flags, logging
from flax import linen as nn
from ml_collections import config_flags

from ravine import models
from ravine import optim
from ravine import sharding
from ravine.experiments import (builders, checkpointing, cli, data, metrics, preemption, spikes,
                         train_lib)
from ravine.experiments import workdir as workdir_lib
# issue 21: profiler traces, token files, --optimizer_module, TensorBoard / W&B writers
from ravine.experiments import profiling, token_files, user_modules, writers
# The builders and the metrics log, also reachable from here (older callers use these).
from ravine.experiments.builders import (  # noqa: F401
    LOSS_SCALES, build_loss_scale, build_model_config, build_optimizer, build_schedule,
    no_decay_mask, validate)
from ravine.experiments.metrics import METRICS_FILE, PLOT_FILE, MetricsLog, plot_losses  # noqa: F401

CONFIG_FILE, CHECKPOINT_DIR = "config.json", "checkpoints"
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "lm.py")
EXIT_STOPPED = 1  # diverged, or a checkpoint could not be saved
# Dense bf16 peak FLOP/s per device, by a substring of `device.device_kind`, for MFU.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "TPU v6": 918e12,
              "TPU v5p": 459e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v4": 275e12}


def define_flags(default_config=DEFAULT_CONFIG):
    """Defines --config (a config file, `path[:variant]`), --workdir and --multihost; the
    scripts built on the train job (experiments.race) call it with their own default."""
    # --optimizer_module: a user's optim.register(...) runs before the config gets its fields
    user_modules.define_and_import()
    config = cli.define_config_flag(
        config_flags.DEFINE_config_file, "config", default_config,
        "Config file, `path[:variant]`.", lock_config=True)
    workdir = flags.DEFINE_string("workdir", None, "Run folder: checkpoints, metrics, plots.")
    multihost = flags.DEFINE_bool("multihost", False,
                                  "Call jax.distributed.initialize() first.")
    return config, workdir, multihost


class Diverged(RuntimeError):
    """The loss became non-finite with no loss scaling to skip it, or spike rollbacks ran
    out of their budget; the message says at which step and what was tried."""


# ----------------------------------------------------------------------------- set-up


def state_signature(abstract_state):
    """A hash of the state's tree paths, shapes and dtypes: a checkpoint restores onto a
    state with the same signature only."""
    leaves = jax.tree.leaves_with_path(abstract_state)
    text = repr([(jax.tree_util.keystr(path), leaf.shape, str(leaf.dtype))
                 for path, leaf in leaves])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _peak_flops(config):
    if config.peak_flops:
        return config.peak_flops
    kind = jax.devices()[0].device_kind
    return next((peak for key, peak in PEAK_FLOPS.items() if key in kind), None)


def state_layout(fns, mesh, zero, offload=False):
    """`(abstract_state, state_shardings)` of `builders.make_train_step`'s state on `mesh`:
    params by their logical axes (also split over `data` at ZeRO-3), optimizer state
    following them (split over `data` from ZeRO-1 on; in host memory when `offload`)."""
    key = jax.random.key(0)
    abstract = jax.eval_shape(fns.init, key)
    params = abstract["params"]
    param_sh = sharding.param_shardings_for_zero(
        params, sharding.logical_to_shardings(jax.eval_shape(fns.init_params, key), mesh), zero)
    replicated = sharding.replicated(mesh)
    state_sh = {
        "step": replicated, "skipped": replicated, "params": param_sh,
        "loss_scale": jax.tree.map(lambda _: replicated, abstract["loss_scale"]),
        "opt_state": sharding.optimizer_state_shardings(fns.tx, params, param_sh, zero)}
    if offload:
        state_sh["opt_state"] = sharding.host_offload(state_sh["opt_state"])
    for name in ("ema", "average"):
        if name in abstract:
            state_sh[name] = sharding.follow_param_shardings(abstract[name], params, param_sh)
    abstract_state = jax.tree.map(
        lambda leaf, sh: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sh),
        abstract, state_sh)
    return abstract_state, state_sh


@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything a run needs, built and validated from a config before any file is written."""
    config: Any
    corpus: data.Corpus
    mesh: Any
    model_config: models.TransformerConfig
    n_params: int
    init: Any              # key -> state, jitted onto the mesh
    init_from_params: Any  # params -> state at step 0 around them, jitted onto the mesh
    abstract_state: Any    # ShapeDtypeStructs with the state's shardings
    train_step: Any        # sharding.jit_train_step(...)
    eval_step: Any         # jitted (params, batch) -> loss
    eval_params: Any       # (params, opt_state) -> the params to evaluate (jitted if not
                           # the params themselves: Schedule-Free's x)
    eval_batch: Any        # global uint8 [eval_batches, batch_size, seq_len + 1] array
    signature: str
    flops_per_token: float
    peak_flops: float | None
    loss_scaled: bool      # whether a loss scale skips non-finite steps (dynamic scaling)

    @contextlib.contextmanager
    def in_mesh(self):
        """The mesh and logical-axis rules, for model code run outside `train_step`."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(sharding.RULES):
            yield


def setup(config):
    """Validates `config` and builds the corpus, mesh, model, optimizer and jitted steps.

    Raises ValueError (naming the bad value) for anything wrong with the config.
    """
    fns = builders.make_train_step(config)  # validates config first
    mesh = sharding.make_mesh(config.mesh)
    data_parallel = mesh.shape[sharding.DATA] * mesh.shape[sharding.FSDP]
    if config.batch_size % data_parallel:
        raise ValueError(f"config.batch_size {config.batch_size} is not divisible by the "
                         f"data-parallel size {data_parallel} of mesh {config.mesh!r}")
    if config.batch_size % jax.process_count():
        raise ValueError(f"config.batch_size {config.batch_size} is not divisible by the "
                         f"{jax.process_count()} processes")
    corpus = token_files.corpus_for_config(config)  # text, or a .bin / .npy token file
    data.check_length(corpus, config.seq_len)
    abstract_state, state_sh = state_layout(fns, mesh, config.zero,
                                            config.offload_optimizer_state)
    if config.zero >= 2:  # ZeRO-2/3: gradients reduce-scattered onto each device's shard
        if fns.step_for_loss is None:
            raise ValueError(f"config.zero={config.zero}: optimizer "
                             f"{config.optimizer.name!r} takes ZeRO 0 or 1 only")
        params = abstract_state["params"]
        loss_fn = sharding.with_sharded_gradients(
            fns.loss_fn, state_sh["params"],
            sharding.gradient_shardings(params, state_sh["params"], config.zero))
        fns = fns._replace(train_step=fns.step_for_loss(loss_fn))
    batch_sh = sharding.batch_sharding(mesh, batch_dim=1)
    eval_rows = data.sample_batch(
        corpus.valid, config.seed, 0, config.batch_size, config.seq_len,
        micro_batches=config.eval_batches, process_index=jax.process_index(),
        process_count=jax.process_count(), stream=data.EVAL_STREAM)

    return Setup(
        config=config, corpus=corpus, mesh=mesh, model_config=fns.model_config,
        n_params=models.count_params(abstract_state["params"]),
        init=jax.jit(fns.init, out_shardings=state_sh),
        init_from_params=jax.jit(lambda params: _state_around(fns, config, params),
                                 out_shardings=state_sh),
        abstract_state=abstract_state,
        train_step=sharding.jit_train_step(fns.train_step, mesh, state_sh, batch_sh),
        eval_step=jax.jit(fns.eval_step, in_shardings=(state_sh["params"], batch_sh),
                          out_shardings=sharding.replicated(mesh)),
        eval_params=(fns.eval_params if fns.eval_params is train_lib.params_of else
                     jax.jit(fns.eval_params, out_shardings=state_sh["params"])),
        eval_batch=sharding.shard_batch(eval_rows, mesh, batch_dim=1),
        signature=state_signature(abstract_state),
        flops_per_token=models.flops_per_token(fns.model_config, config.seq_len),
        peak_flops=_peak_flops(config),
        loss_scaled=not isinstance(fns.loss_scale, optim.NoOpLossScale))


def _state_around(fns, config, params):
    return train_lib.init_state(params, fns.tx, fns.loss_scale, config.ema_decay,
                                config.average_from_step)


# ----------------------------------------------------------------------------- pieces


def batch_at(s, position):
    """Training batch number `position` (this process's rows), on the mesh."""
    cfg = s.config
    rows = data.sample_batch(
        s.corpus.train, cfg.seed, position, cfg.batch_size, cfg.seq_len,
        micro_batches=cfg.grad_accum, process_index=jax.process_index(),
        process_count=jax.process_count())
    return sharding.shard_batch(rows, s.mesh, batch_dim=1)


def evaluate(s, state):
    """Eval losses of the params (the optimizer's eval params: Schedule-Free's x) and of the
    EMA / tail average, when the state has them."""
    with s.in_mesh():
        params = s.eval_params(state["params"], state["opt_state"])
        row = {"eval_loss": float(s.eval_step(params, s.eval_batch))}
        if "ema" in state:
            row["eval_loss_ema"] = float(s.eval_step(state["ema"], s.eval_batch))
        if "average" in state and int(state["average"].count) > 0:
            row["eval_loss_avg"] = float(s.eval_step(state["average"].average, s.eval_batch))
    return row


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
        changes.append(("corpus (SHA-256 of its documents)", meta["corpus_sha256"][:12],
                        s.corpus.sha256[:12]))
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
        want = jax.tree.map(lambda x: (x.shape, x.dtype), s.abstract_state["params"])
        got = jax.tree.map(lambda x: (x.shape, x.dtype), restored["params"])
        if want != got:
            raise cli.UsageError(f"config.init_from={spec!r}: its model has other "
                                 "parameters than this config's model")
    checkpoints.close()
    if s.config.init_from_optimizer:
        return restored, {"step": int(meta["step"]), "data_offset": meta["data_offset"],
                          "rollbacks": 0, "spike": meta["spike"], "init_from": spec}
    state = s.init_from_params(restored["params"])
    return state, {"step": 0, "data_offset": 0, "rollbacks": 0, "spike": {},
                   "init_from": spec}


def roll_back(s, checkpoints, log, monitor, step, tries):
    """Restores the latest checkpoint from before the spike (or the initial state) and
    deletes later checkpoints and metrics rows; returns (state, meta). Raises Diverged
    when `spike_max_rollbacks` rollbacks to the same step did not get past the spike."""
    good = max((c for c in checkpoints.steps() if c <= monitor.first), default=0)
    tries[good] = tries.get(good, 0) + 1
    if tries[good] > s.config.spike_max_rollbacks:
        raise Diverged(f"loss spike at step {step} (loss {monitor.last:.4g}) after "
                       f"{s.config.spike_max_rollbacks} rollbacks to step {good}; stopping "
                       f"(checkpoints kept; a smaller learning rate may help)")
    logging.warning("loss spike at steps %d-%d: rolling back to step %d and skipping %d "
                    "batches", monitor.first + 1, step, good, s.config.spike_skip)
    checkpoints.delete_after(good)
    state, meta = (checkpoints.restore(good, s.abstract_state) if good in checkpoints.steps()
                   else _fresh(s))
    monitor.load(meta["spike"])
    log.truncate(meta["step"])
    return state, meta


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


def check_finite(s, row, saved):
    """Raises Diverged for a non-finite logged loss when no loss scale skips such steps."""
    if not math.isfinite(row["loss"]) and not s.loss_scaled:
        raise Diverged(
            f"loss {row['loss']} at step {row['step']} with no loss scaling to skip the "
            f"step; stopping (checkpoint {saved or 'none'} is the last saved; a smaller "
            "learning rate or another precision may help)")


def _warn(message):
    print(f"warning: {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- train


def train(config, workdir, progress=True, *, prepared=None, stop=None,
          raise_on_divergence=False):
    """Trains `config` in `workdir` (resuming from its latest checkpoint); returns a summary:
    steps, final_loss, final_eval_loss(_ema/_avg), tokens_per_sec (median), skipped_steps,
    rollbacks, seconds, params, history (the metrics.jsonl rows), diverged (the run
    stopped on a non-finite loss or a spent rollback budget; its final eval losses are
    then NaN) and stopped_by (the signal that stopped it early, or None).

    Args:
      config: an experiments/configs/lm.py config.
      workdir: the run folder (see the workdir rules in the module docstring).
      progress: show a progress bar on stderr.
      prepared: `setup(config)`, when the caller built it already.
      stop: a `preemption.StopSignal` to obey (default: none; signals act as usual).
      raise_on_divergence: raise Diverged instead of returning a `diverged` summary.

    Raises:
      ValueError: a bad config or workdir, before anything is written (also
        `workdir.WorkdirBusy`, when another run holds the workdir).
      checkpointing.SaveError: a checkpoint could not be written (e.g. a full disk).
    """
    # -- mesh, data, model, optimizer: every check before a file is written
    s = prepared or setup(config)
    check_workdir(s, workdir)
    is_main, stop = jax.process_index() == 0, stop or preemption.NoStop()
    with workdir_lib.lock(workdir, enabled=is_main), contextlib.ExitStack() as cleanup:
        # -- state: the newest checkpoint that restores, a branch, or a fresh start
        checkpoints = checkpointing.Checkpoints(os.path.join(workdir, CHECKPOINT_DIR),
                                                config.keep_checkpoints)
        cleanup.callback(_close_quietly, checkpoints)
        state, meta = restore_or_start(s, checkpoints, workdir)
        if is_main:
            _start_phase(metrics.write_json, os.path.join(workdir, CONFIG_FILE), run_info(s))
        log = metrics.MetricsLog(os.path.join(workdir, METRICS_FILE), is_main)
        log.truncate(meta["step"])
        step, data_offset, rollbacks = int(meta["step"]), meta["data_offset"], meta["rollbacks"]
        monitor = spikes.SpikeMonitor(config.spike_factor, config.spike_window,
                                      config.spike_patience)
        monitor.load(meta["spike"])
        same_run = {"init_from": meta.get("init_from"), "signature": s.signature,
                    "corpus_sha256": s.corpus.sha256, "config": config_record(config)}
        board = cleanup.enter_context(writers.for_run(config, workdir, meta, is_main))
        same_run.update(board.checkpoint_meta())  # the W&B run id: a resume continues it
        profiler = cleanup.enter_context(
            profiling.Profiler(config.profile_steps, workdir, is_main))
        bar = cleanup.enter_context(tqdm.tqdm(
            total=config.steps, initial=step, unit="step", dynamic_ncols=True,
            disable=not (progress and is_main)))
        clock = metrics.Throughput(config.grad_accum * config.batch_size * config.seq_len)
        tries, diverged, saved = {}, False, step

        # -- the loop
        try:
            while step < config.steps:
                state, out = profiler.run(step + 1, s.train_step, state,
                                          batch_at(s, step + data_offset))
                step += 1
                bar.update(1)
                checkpoints.poll()  # a failed background save surfaces here
                if config.spike_rollback and monitor.observe(step - 1, float(out["loss"])):
                    state, meta = roll_back(s, checkpoints, log, monitor, step, tries)
                    step, data_offset = int(meta["step"]), data_offset + config.spike_skip
                    rollbacks += 1  # data_offset only grows: the spike's batches stay unseen
                    bar.reset(total=config.steps)
                    bar.update(step)
                    continue
                clock.start_once(state)  # after the first step: compilation is not timed
                is_eval = config.eval_every and (step % config.eval_every == 0
                                                 or step == config.steps)
                is_log = step % config.log_every == 0 or step == config.steps or is_eval
                stopping = stop.reached(step)  # after SIGTERM / SIGINT: save and stop
                is_save = (config.checkpoint_every and step % config.checkpoint_every == 0
                           or step == config.steps or stopping)
                if is_log:
                    row = metrics.train_row(step, jax.device_get(out), state, rollbacks,
                                            clock, s.flops_per_token, s.peak_flops)
                    # -- evaluation
                    if is_eval:
                        row.update(evaluate(s, state))
                    log.write(row)
                    board.write(row)
                    bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.2e}",
                                    tok_s=f"{row['tokens_per_sec'] or 0:.3g}")
                    check_finite(s, row, saved)
                # -- checkpoint
                if is_save:
                    checkpoints.save(step, state, {
                        "step": step, "data_offset": data_offset, "rollbacks": rollbacks,
                        "spike": monitor.state(), **same_run})
                    saved = step
                if is_log or is_save:  # tokens/s counts training only, not eval or saving
                    clock.restart(step)
                if stopping:
                    break
        except Diverged:
            if raise_on_divergence:
                raise
            diverged = True
        checkpoints.close()
    rows = log.rows() if is_main else []
    if is_main and rows:
        plot_losses(rows, os.path.join(workdir, PLOT_FILE))
    summary = metrics.summarize(rows, workdir, step, s.n_params, rollbacks, clock.elapsed(),
                                diverged=diverged)
    return {**summary, "stopped_by": stop.name if step < config.steps else None}


def _close_quietly(checkpoints):
    """Releases the checkpoint manager on the way out of a failing run (the failure that
    is propagating is the one to report)."""
    with contextlib.suppress(Exception):
        checkpoints.close()


def _start_phase(function, *args):
    """Runs `function`; an OSError (a full disk, a read-only folder) becomes a UsageError."""
    try:
        return function(*args)
    except OSError as error:
        raise cli.UsageError(f"{error.filename or ''}: {error.strerror or error}") from None


class Run:
    """`Run(setup(config), workdir).train(progress)`: `train` with a Setup built already."""

    def __init__(self, setup_, workdir):
        self.setup, self.workdir = setup_, workdir

    def train(self, progress=True):
        return train(self.setup.config, self.workdir, progress, prepared=self.setup)


def main(argv, flag_holders):
    """The script: `flag_holders` are `define_flags()`'s; bad input exits 2 with one line,
    a run that stops early (diverged, failed save, signal) exits nonzero with one line."""
    config_flag, workdir_flag, multihost_flag = flag_holders
    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
    if multihost_flag.value:
        jax.distributed.initialize()
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    config = cli.flag_value(config_flag)
    workdir = workdir_flag.value
    if not workdir:
        cli.fail("--workdir is required")
    stop = preemption.StopSignal()
    try:
        with stop.installed():
            with cli.usage_errors():
                s = setup(config)
            summary = train(config, workdir, prepared=s, stop=stop, raise_on_divergence=True)
    except cli.UsageError as error:  # a bad workdir, another run in it, a changed config
        cli.fail(error)
    except KeyboardInterrupt:  # a second Ctrl-C, or one before the run got going
        cli.stopped(f"interrupted; re-running the same command resumes from "
                    f"{_latest(workdir)}", 130)
    except (Diverged, OSError, checkpointing.RestoreError) as error:
        cli.stopped(f"error: {error}", EXIT_STOPPED)
    if summary["stopped_by"]:
        cli.stopped(f"stopped by {summary['stopped_by']} at step {summary['steps']} "
                    f"(checkpoint {summary['steps']} saved); re-running the same command "
                    "resumes from it", config.preempt_exit_code)


def _latest(workdir):
    folder = os.path.join(workdir, CHECKPOINT_DIR)
    with contextlib.suppress(Exception):
        step = checkpointing.Checkpoints(folder, read_only=True).latest_step()
        if step is not None:
            return f"checkpoint {step}"
    return "the start (no checkpoint yet)"


def run_script():
    """`python -m ravine.experiments.train`: defines the flags and runs `main`."""
    holders = define_flags()
    cli.run(lambda argv: main(argv, holders))


if __name__ == "__main__":
    run_script()
