"""The training loop: steps, evaluation, logging, checkpoints, preemption, spike rollback.

    summary = loop.train(lm.get_config("tiny"), "runs/tiny")

Steps are counted from 1: the row with `step = s` has the loss of the s-th update (of the
params after s - 1 updates) and, on eval steps, the eval losses of the params after s
updates; the checkpoint at step s holds the state after s updates. The batch of update s
is batch number `s - 1 + data_offset` of the seekable sampler (`runtime.data`), where
`data_offset` grows by `spike_skip` at each spike rollback.
"""
import contextlib
import math
import os
from typing import Any, Callable, NamedTuple, Protocol

import jax
import tqdm
from absl import logging

from ravine import sharding
from ravine.experiments.runtime import (checkpointing, cli, data, metrics, preemption,
                                        profiling, spikes, writers)
from ravine.experiments.runtime import workdir as workdir_lib
from ravine.experiments.runtime.metrics import METRICS_FILE, PLOT_FILE, plot_losses
from ravine.experiments.runtime.run_identity import (CHECKPOINT_DIR, CONFIG_FILE,
                                                     check_workdir, config_record,
                                                     restore_or_start, run_info, _fresh)
from ravine.experiments.runtime.setup import setup
from ravine.experiments.runtime.state import TrainState

class Diverged(RuntimeError):
    """The loss became non-finite with no loss scaling to skip it, or spike rollbacks ran
    out of their budget; the message says at which step and what was tried."""


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
        params = s.eval_params(state.params, state.opt_state)
        row = {"eval_loss": float(s.eval_step(params, s.eval_batch))}
        if state.ema is not None:
            row["eval_loss_ema"] = float(s.eval_step(state.ema, s.eval_batch))
        if state.average is not None and int(state.average.count) > 0:
            row["eval_loss_avg"] = float(s.eval_step(state.average.average, s.eval_batch))
    return row


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


class Runs(Protocol):
    """What `run_loop` drives: one run (the train job) or a group of runs (a sweep).

    Attributes:
      n_runs: how many runs one state holds (rows per log step).
      loss_scaled: whether a loss scale skips non-finite steps (then a non-finite loss
        does not end a run).
    """
    n_runs: int
    loss_scaled: bool

    def step(self, state: TrainState, position: int, step: int) -> tuple[TrainState, Any]:
        """Update `step` (counted from 1) of every run on batch number `position`."""

    def log_rows(self, step: int, out: Any, state: TrainState, rollbacks: int,
                 clock: metrics.Throughput) -> list[dict]:
        """One metrics row per run from the step's (host) outputs `out`."""

    def evaluate(self, state: TrainState) -> list[dict]:
        """One dict of eval losses per run."""


class LoopEnd(NamedTuple):
    """Where `run_loop` stopped: the state, the step, the data offset and rollbacks so far,
    the last saved checkpoint's step, and why every run ended early (a non-finite loss with
    no loss scaling to skip it, or a loss spike past its rollback budget), or None."""
    state: TrainState
    step: int
    data_offset: int
    rollbacks: int
    saved: int
    diverged: str | None


def run_loop(runs: Runs, state: TrainState, meta: dict, config: Any, checkpoints: Any,
             write_rows: Callable[[list], None], *, stop: Any = None,
             spike_guard: "SpikeGuard | None" = None, clock: Any = None,
             extra_meta: Callable[[], dict] = dict, on_step: Callable[[int], None] = None,
             save_at_end: bool = True, alive: list | None = None) -> LoopEnd:
    """The training loop, for one run or a group of runs sharing one compiled step.

    From `meta`'s step (and data offset, rollbacks) to `config.steps`: update, then on log
    steps a row per run (with eval losses on eval steps) to `write_rows`, a checkpoint on
    checkpoint steps (`meta` = step, data offset, rollbacks, `extra_meta()`), a loss spike
    rolled back by `spike_guard`, a stop signal obeyed after the step (save, then stop).
    A run whose logged loss is non-finite (unless `runs.loss_scaled`) is over; the loop
    ends when every run is, or when a spike outlasts its rollbacks (`LoopEnd.diverged` says
    which). `alive`: which runs are not over yet.
    """
    step, data_offset, rollbacks = int(meta["step"]), meta["data_offset"], meta["rollbacks"]
    stop = stop or preemption.NoStop()
    alive = list(alive) if alive is not None else [True] * runs.n_runs
    saved = step
    while step < config.steps and any(alive):
        # -- one update of every run
        state, out = runs.step(state, step + data_offset, step + 1)
        step += 1
        checkpoints.poll()  # a failed background save surfaces here
        if on_step is not None:
            on_step(step)
        # -- a loss spike: back to the last good checkpoint, past the spike's batches
        if spike_guard is not None:
            try:
                rolled = spike_guard.check(step, out)
            except Diverged as error:
                return LoopEnd(state, step, data_offset, rollbacks, saved, str(error))
            if rolled is not None:
                state, meta = rolled
                step, data_offset = int(meta["step"]), data_offset + config.spike_skip
                rollbacks += 1  # data_offset only grows: the spike's batches stay unseen
                if on_step is not None:
                    on_step(step)
                continue
        if clock is not None:
            clock.start_once(state)  # after the first step: compilation is not timed
        is_eval = config.eval_every and (step % config.eval_every == 0 or step == config.steps)
        is_log = step % config.log_every == 0 or step == config.steps or is_eval
        stopping = stop.reached(step)  # after SIGTERM / SIGINT: save and stop
        is_last = step == config.steps
        is_save = (config.checkpoint_every and step % config.checkpoint_every == 0
                   and (save_at_end or not is_last)) or (save_at_end and is_last) or stopping
        # -- log, with evaluation
        if is_log:
            rows = runs.log_rows(step, jax.device_get(out), state, rollbacks, clock)
            if is_eval:
                for row, losses in zip(rows, runs.evaluate(state), strict=True):
                    row.update(losses)
            write_rows(rows)
            alive = [was and (runs.loss_scaled or math.isfinite(row["loss"]))
                     for was, row in zip(alive, rows, strict=True)]
            if not any(alive):
                return LoopEnd(state, step, data_offset, rollbacks, saved, (
                    f"loss {rows[0]['loss']} at step {step} with no loss scaling to skip the "
                    f"step; stopping (checkpoint {saved or 'none'} is the last saved; a "
                    "smaller learning rate or another precision may help)"))
        # -- checkpoint
        if is_save:
            checkpoints.save(step, state, {"step": step, "data_offset": data_offset,
                                           "rollbacks": rollbacks, **extra_meta()})
            saved = step
        if clock is not None and (is_log or is_save):  # tokens/s: training only
            clock.restart(step)
        if stopping:
            break
    return LoopEnd(state, step, data_offset, rollbacks, saved, None)


class SpikeGuard:
    """Watches the loss for spikes (`spikes.SpikeMonitor`) and rolls a run back past them."""

    def __init__(self, s, checkpoints, log, monitor):
        self.s, self.checkpoints, self.log, self.monitor = s, checkpoints, log, monitor
        self.tries = {}

    def check(self, step, out):
        """`(state, meta)` restored from before a spike seen at `step`, or None."""
        if not self.monitor.observe(step - 1, float(out["loss"])):
            return None
        return roll_back(self.s, self.checkpoints, self.log, self.monitor, step, self.tries)


class OneRun:
    """The train job's `Runs`: one run of a `Setup`, its step under the profiler."""
    n_runs = 1

    def __init__(self, s, profiler):
        self.s, self.profiler, self.loss_scaled = s, profiler, s.loss_scaled

    def step(self, state, position, step):
        return self.profiler.run(step, self.s.train_step, state, batch_at(self.s, position))

    def log_rows(self, step, out, state, rollbacks, clock):
        return [metrics.train_row(step, out, state, rollbacks, clock, self.s.flops_per_token,
                                  self.s.peak_flops, self.s.hardware_flops_per_token)]

    def evaluate(self, state):
        return [evaluate(self.s, state)]


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
    config = s.config  # as the optimizer runs it (see `setup`)
    check_workdir(s, workdir)
    is_main, stop = jax.process_index() == 0, stop or preemption.NoStop()
    if is_main:
        profiling.check(config.profile_steps, workdir, config.steps)
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
        step, rollbacks = int(meta["step"]), meta["rollbacks"]
        monitor = spikes.SpikeMonitor(config.spike_factor, config.spike_window,
                                      config.spike_patience)
        monitor.load(meta["spike"])
        same_run = {"init_from": meta.get("init_from"), "signature": s.signature,
                    "corpus_sha256": s.corpus.sha256, "config": config_record(config)}
        if "init_from_optimizer" in meta:  # the branch point, as recorded when branched
            same_run["init_from_optimizer"] = meta["init_from_optimizer"]
        board = cleanup.enter_context(writers.for_run(config, workdir, meta, is_main))
        same_run.update(board.checkpoint_meta())  # the W&B run id: a resume continues it
        profiler = cleanup.enter_context(
            profiling.Profiler(config.profile_steps, workdir, is_main))
        profiler.warn_if_done(step)
        bar = cleanup.enter_context(tqdm.tqdm(
            total=config.steps, initial=step, unit="step", dynamic_ncols=True,
            disable=not (progress and is_main)))
        clock = metrics.Throughput(config.grad_accum * config.batch_size * config.seq_len)

        def write_rows(rows):
            (row,) = rows
            log.write(row)
            board.write(row)
            bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.2e}",
                            tok_s=f"{row['tokens_per_sec'] or 0:.3g}")

        def on_step(at):
            bar.update(at - bar.n)  # also back, after a rollback

        # -- the loop
        end = run_loop(
            OneRun(s, profiler), state, meta, config, checkpoints, write_rows, stop=stop,
            spike_guard=(SpikeGuard(s, checkpoints, log, monitor)
                         if config.spike_rollback else None),
            clock=clock, extra_meta=lambda: {"spike": monitor.state(), **same_run},
            on_step=on_step)
        step, rollbacks, diverged = end.step, end.rollbacks, end.diverged is not None
        if diverged and raise_on_divergence:
            raise Diverged(end.diverged)
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


