"""Learning-rate / seed sweeps that share their work: one compiled step per optimizer.

    engine = Engine(config)        # the workload and the optimizer (its lr is ignored)
    runs = [SweepRun(lr, seed) for lr in (1e-3, 3e-3) for seed in (0, 1)]
    rows = engine.train_group(runs, "runs/ckpt", vectorized=True)  # {run: metrics rows}

The peak learning rate is an argument of the compiled step (the config's schedule at peak 1,
times lr) and the seed is data (initial params from `init(key(seed))`, batches and the eval
batch from the seekable sampler of `experiments.data`), so one compilation serves every run
of a sweep. Two ways to train a group of runs:

- `vectorized=False` ("loop"): one run after another, with the step laid out on the
  config's mesh exactly as `experiments.train` lays out a single run.
- `vectorized=True` ("vmap"): the runs side by side in one program, `jax.vmap` over params,
  optimizer state, batches and learning rates; the run axis is split over the devices
  (as many as divide the number of runs).

Either way a run reproduces `experiments.train` on the same (lr, seed): the same losses at
every logged step. Under vmap the integer scalars of the state (the step and the
optimizer's step counters) stay unbatched, shared by the runs: a `lax.cond` on a batched
predicate would become a select running both branches, so Shampoo and SOAP would refresh
their roots / eigenbases at every step. A run whose gradients turn non-finite is skipped by
the step (`train_lib`) and so falls behind the shared counters; the race counts such runs as
diverged anyway (`rows[-1]["skipped_steps"] > 0`).

Metrics rows follow `experiments.train`'s metrics.jsonl: `step`, `loss`, `lr`,
`skipped_steps` at every logged step, `eval_loss` at eval steps, plus a row at step 0 with
the initial eval loss (so steps to a target can be interpolated from the start). A group
checkpoints (Orbax, `config.checkpoint_every`) its state together with the rows so far, so a
killed sweep resumes to the same numbers.
"""
import copy
import math
import statistics
import sys
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from ravine import models, optim, sharding
from ravine.experiments.runtime import builders, checkpointing, data, train_lib
from ravine.experiments.runtime.loop import run_loop
from ravine.experiments.runtime.setup import setup as setup_run
from ravine.experiments.runtime.state import shared_leaves

RUN_AXIS = "runs"


class SweepRun(NamedTuple):
    """One point of a sweep: a peak learning rate and a seed."""
    lr: float
    seed: int

    @property
    def key(self):
        """A file-name-safe id, e.g. `lr0.003_seed1`."""
        return f"lr{self.lr:.6g}_seed{self.seed}"


def can_vectorize(name):
    """Whether optimizer `name` can train several runs in one vmapped program (its spec's
    `vmappable`; those that cannot are trained in loop mode)."""
    return optim.spec(name).vmappable


def optimizer_at(config, lr):
    """`(tx, schedule)` of `config`'s optimizer at peak learning rate `lr`, which may be a
    traced scalar: the config's schedule with `peak_value = lr`, so the arithmetic is the
    solo run's (`lr x` a schedule at peak 1 rounds differently, and Shampoo's roots amplify
    one-ulp learning-rate differences to 1e-3 in the loss within 30 steps).

    A second learning rate (Muon's AdamW leaves' `optimizer.adam_learning_rate`) keeps its
    own peak on the same schedule shape, as in `builders.build_optimizer`.
    """
    if config.schedule.get("peak_value") is not None:
        raise ValueError("config.schedule.peak_value must be None in a sweep (the peak is "
                         f"each run's learning rate), got {config.schedule.peak_value!r}")
    cfg = copy.deepcopy(config)
    cfg.schedule.peak_value = lr
    schedule = builders.build_schedule(cfg)
    # build_optimizer shapes a second lr as (its peak / learning_rate) x schedule; with
    # learning_rate 0 it takes a given schedule as is, so a traced lr never enters it.
    cfg.optimizer.learning_rate = 0.0
    for key, peak in list(cfg.optimizer.items()):
        if key.endswith("_learning_rate") and isinstance(peak, (int, float)):
            cfg.schedule.peak_value = peak
            cfg.optimizer[key] = builders.scaled_schedule(builders.build_schedule(cfg), peak,
                                                          0.0, key)
    return builders.build_optimizer(cfg, schedule), schedule


def check_config(config):
    """ValueError naming the bad value for anything wrong with `config`'s optimizer, before
    any compilation (an optimizer with its own step builds it, which checks it)."""
    if not builders.optimizer_spec(config).is_transform:
        builders.make_train_step(config)
    else:
        builders.validate(config)
        optimizer_at(config, 1.0)


class Engine:
    """The compiled pieces shared by every run of one optimizer's sweep on one workload.

    Args:
      config: an `experiments.configs.lm` config naming the optimizer; its
        `optimizer.learning_rate` and `seed` are ignored (each run brings its own).

    Raises:
      ValueError: naming the bad value, for anything wrong with the config.
    """

    def __init__(self, config):
        self.config = config
        self.setup = setup = setup_run(config)
        self.name = config.optimizer.name
        # A step of its own (K-FAC's spec.train_step), with no lr to inject
        self.own_step = not builders.optimizer_spec(config).is_transform
        if not self.own_step:
            optimizer_at(config, 1.0)  # checks a second learning rate eagerly
        self.model = models.Transformer(setup.model_config)
        self.loss_fn = train_lib.lm_loss(self.model)
        self._eval_fn = train_lib.make_eval_step(self.loss_fn)
        mesh = setup.mesh
        self.state_shardings = jax.tree.map(lambda leaf: leaf.sharding, setup.abstract_state)
        self.batch_sharding = sharding.batch_sharding(mesh, batch_dim=1)
        replicated = sharding.replicated(mesh)
        self._step = jax.jit(self._step_fn,
                             in_shardings=(self.state_shardings, self.batch_sharding,
                                           replicated, replicated),
                             out_shardings=(self.state_shardings, replicated),
                             donate_argnums=(0,))
        self._vmapped = {}  # number of runs -> (jitted step, jitted eval, shardings)
        self._eval_batches = {}
        self._own_steps = {}  # (lr, seed) -> the solo job's jitted step (own_step only)

    # -- the step

    def _step_fn(self, state, batch, lr, seed):
        cfg = self.config
        tx, schedule = optimizer_at(cfg, lr)
        # Sophia's Hessian estimator (its keys from the run's seed), Schedule-Free's eval
        # params: as in the train job.
        step_kwargs = builders.optimizer_step_kwargs(cfg, self.model, seed)
        step = train_lib.make_train_step(self.loss_fn, tx, schedule, cfg.ema_decay,
                                         cfg.average_from_step, **step_kwargs)
        state, metrics = step(state, batch)
        return state, {key: metrics[key] for key in ("loss", "lr", "finite")}

    def step(self, state, batch, lr, seed):
        """One update of a single run (the loop mode's compiled step)."""
        if self.own_step:
            return self._solo_step(lr, seed)(state, batch)
        with self.setup.in_mesh():
            return self._step(state, batch, jnp.asarray(lr, jnp.float32),
                              jnp.asarray(seed, jnp.int32))

    def _solo_step(self, lr, seed):
        """A registered step takes its lr and seed from the config, not as data: each run
        gets the solo train job's jitted step (one compilation per run; the latest kept)."""
        if (lr, seed) not in self._own_steps:
            config = copy.deepcopy(self.config)
            config.optimizer.learning_rate, config.seed = float(lr), int(seed)
            self._own_steps = {(lr, seed): setup_run(config).train_step}
        return self._own_steps[(lr, seed)]

    def _vectorized(self, n_runs):
        """(step, eval, run-axis sharding, replicated) for a group of `n_runs` runs."""
        if n_runs in self._vmapped:
            return self._vmapped[n_runs]
        n_devices = math.gcd(n_runs, jax.device_count())
        mesh = jax.make_mesh((n_devices,), (RUN_AXIS,), devices=jax.devices()[:n_devices],
                             axis_types=(AxisType.Auto,))  # GSPMD decides, as in train
        split = NamedSharding(mesh, PartitionSpec(RUN_AXIS))
        whole = NamedSharding(mesh, PartitionSpec())
        mask = shared_leaves(self.setup.abstract_state)
        axes = jax.tree.map(lambda shared: None if shared else 0, mask)
        state_sh = jax.tree.map(lambda shared: whole if shared else split, mask)

        def step_fn(state, batch, lr, seed):
            new, metrics = jax.vmap(self._step_fn, in_axes=(axes, 0, 0, 0))(
                state, batch, lr, seed)
            # Every healthy run advanced the shared counters alike; a run that skipped a
            # non-finite step fell behind (and counts as diverged).
            new = jax.tree.map(lambda leaf, shared: leaf.max(0) if shared else leaf,
                               new, mask)
            return new, metrics

        step = jax.jit(step_fn, in_shardings=(state_sh, split, split, split),
                       out_shardings=(state_sh, split), donate_argnums=(0,))
        eval_point = builders.eval_params_fn(self.config)

        def evaluate_run(params, opt_state, batch):  # at the optimizer's eval params
            return self._eval_fn(eval_point(params, opt_state), batch)

        opt_sh = state_sh.opt_state
        evaluate = jax.jit(jax.vmap(evaluate_run, in_axes=(0, axes.opt_state, 0)),
                           in_shardings=(split, opt_sh, split), out_shardings=split)
        self._vmapped[n_runs] = (step, evaluate, state_sh, split)
        return self._vmapped[n_runs]

    # -- data

    def _rows(self, seed, position):
        cfg = self.config
        return data.sample_batch(self.setup.corpus.train, seed, position, cfg.batch_size,
                                 cfg.seq_len, micro_batches=cfg.grad_accum)

    def _eval_rows(self, seed):
        cfg = self.config
        return data.sample_batch(self.setup.corpus.valid, seed, 0, cfg.batch_size,
                                 cfg.seq_len, micro_batches=cfg.eval_batches,
                                 stream=data.EVAL_STREAM)

    def _eval_batch(self, seed):
        if seed not in self._eval_batches:
            self._eval_batches[seed] = sharding.shard_batch(self._eval_rows(seed),
                                                            self.setup.mesh, batch_dim=1)
        return self._eval_batches[seed]

    def init(self, seed):
        """A single run's initial state (as `experiments.train` makes it)."""
        return self.setup.init(jax.random.key(seed))

    # -- training a group of runs

    def _group(self, runs, vectorized):
        """The `loop.Runs` of `runs`: one run on the config's mesh, or several vmapped."""
        return (_VmappedRuns if vectorized else _LoopRun)(self, runs)

    def train_group(self, runs, checkpoint_dir, vectorized=False):
        """Trains `runs` together (vmap) or the single run in `runs` (loop) with the train
        job's loop (`loop.run_loop`), resuming from `checkpoint_dir` if it holds a
        checkpoint that restores (a damaged one: one warning line naming it, and the one
        before or the start); returns `{run: metrics rows}`.

        A loop run stops early once its loss is non-finite (diverged); a vmapped group
        stops when every run has.
        """
        group = self._group(runs, vectorized)
        state = group.init()
        checkpoints = checkpointing.Checkpoints(checkpoint_dir, keep=1)
        abstract = jax.tree.map(
            lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding),
            state)
        # A damaged checkpoint (the train job's rule): one warning line naming it, then the
        # one before, or the group from the start; its runs' numbers are the same either way.
        restored = checkpoints.restore_newest(
            abstract, warn=lambda message: _warn(f"{checkpoint_dir}: {message}"),
            start_over=True)
        if restored is not None:
            state, meta = restored
            rows = meta["rows"]
        else:  # a row at step 0: steps to a target interpolate from the start
            meta = {"step": 0, "data_offset": 0, "rollbacks": 0}
            rows = [[{"step": 0, **losses}] for losses in group.evaluate(state)]

        def write_rows(new_rows):
            for run_rows, row in zip(rows, new_rows, strict=True):
                run_rows.append(row)

        alive = [all(math.isfinite(row.get("loss", 0.0)) for row in run_rows)
                 for run_rows in rows]
        run_loop(group, state, meta, self.config, checkpoints, write_rows, alive=alive,
                 extra_meta=lambda: {"rows": rows, "runs": [run.key for run in runs]},
                 save_at_end=False)  # a finished group's checkpoint is never read
        checkpoints.close()
        return dict(zip(runs, rows))

    def seconds_per_step(self, lr, steps=10, warmup=2):
        """Median seconds of one update of a single run (loop step), compile excluded."""
        state = self.init(0)
        times = []
        for position in range(warmup + steps):
            batch = sharding.shard_batch(self._rows(0, position), self.setup.mesh,
                                         batch_dim=1)
            start = time.perf_counter()
            state, _ = self.step(state, batch, lr, 0)
            jax.block_until_ready(state)
            times.append(time.perf_counter() - start)
        return statistics.median(times[warmup:])

    def state_bytes(self):
        """Bytes of one run's optimizer state."""
        return sum(leaf.size * leaf.dtype.itemsize
                   for leaf in jax.tree.leaves(self.setup.abstract_state.opt_state))


def _warn(message):
    print(f"warning: {message}", file=sys.stderr, flush=True)


class _LoopRun:
    """One run of a sweep, with the step laid out on the config's mesh (loop mode)."""
    n_runs = 1
    # The race counts a run with a non-finite step as diverged: such a run is over, loss
    # scale or not.
    loss_scaled = False

    def __init__(self, engine, runs):
        (self.run,), self.engine = runs, engine

    def init(self):
        return self.engine.init(self.run.seed)

    def step(self, state, position, step):
        del step
        engine, run = self.engine, self.run
        batch = sharding.shard_batch(engine._rows(run.seed, position), engine.setup.mesh,
                                     batch_dim=1)
        return engine.step(state, batch, run.lr, run.seed)

    def log_rows(self, step, out, state, rollbacks, clock):
        del rollbacks, clock
        return [{"step": step, "loss": out["loss"].item(), "lr": out["lr"].item(),
                 "skipped_steps": int(state.skipped)}]

    def evaluate(self, state):
        s = self.engine.setup
        with s.in_mesh():
            params = s.eval_params(state.params, state.opt_state)
            return [{"eval_loss": float(s.eval_step(params,
                                                    self.engine._eval_batch(self.run.seed)))}]


class _VmappedRuns:
    """Several runs of a sweep side by side in one vmapped program (vmap mode)."""
    loss_scaled = False  # as `_LoopRun`

    def __init__(self, engine, runs):
        self.engine, self.runs, self.n_runs = engine, runs, len(runs)
        self._step, self._eval, self.state_sh, split = engine._vectorized(len(runs))
        self.split = split
        self.lrs = jax.device_put(np.array([run.lr for run in runs], np.float32), split)
        self.seeds = jax.device_put(np.array([run.seed for run in runs], np.int32), split)
        self.eval_batch = jax.device_put(
            np.stack([engine._eval_rows(run.seed) for run in runs]), split)

    def init(self):
        mask = shared_leaves(self.engine.setup.abstract_state)
        states = [jax.device_get(self.engine.init(run.seed)) for run in self.runs]
        stacked = jax.tree.map(lambda shared, *leaves: leaves[0] if shared
                               else np.stack(leaves), mask, *states)
        return jax.device_put(stacked, self.state_sh)

    def step(self, state, position, step):
        del step
        batch = np.stack([self.engine._rows(run.seed, position) for run in self.runs])
        return self._step(state, jax.device_put(batch, self.split), self.lrs, self.seeds)

    def log_rows(self, step, out, state, rollbacks, clock):
        del rollbacks, clock
        skipped = np.broadcast_to(jax.device_get(state.skipped), self.n_runs)
        return [{"step": step, "loss": loss.item(), "lr": lr.item(),
                 "skipped_steps": int(skip)}
                for loss, lr, skip in zip(out["loss"], out["lr"], skipped, strict=True)]

    def evaluate(self, state):
        losses = jax.device_get(self._eval(state.params, state.opt_state, self.eval_batch))
        return [{"eval_loss": float(loss)} for loss in losses]
