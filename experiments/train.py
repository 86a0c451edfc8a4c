r"""Train a byte-level transformer LM from a config, resuming from DIR's latest checkpoint.

    python -m experiments.train --config=experiments/configs/lm.py:tiny --workdir=runs/tiny \
        --config.optimizer.name=lion --config.optimizer.learning_rate=3e-4

Writes DIR/metrics.jsonl (a row per logged step), DIR/config.json (the resolved config and
the corpus' size and hash), DIR/checkpoints/ (Orbax) and DIR/loss.png; a tqdm bar on stderr.
Bad flags or config values exit with status 2 and one line on stderr, before DIR is touched.
For emulated devices on CPU set `JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES=8`; on several hosts
set `--multihost` (calls `jax.distributed.initialize()`; each host reads its rows of a batch).

In Python (e.g. experiments/race.py): `summary = train(lm.get_config("tiny"), workdir)`.

Steps are counted from 1: the row with `step = s` has the loss of the s-th update (of the
params after s - 1 updates) and, on eval steps, the eval losses of the params after s
updates; the checkpoint at step s holds the state after s updates. The batch of update s
is batch number `s - 1 + data_offset` of the seekable sampler (`experiments.data`), where
`data_offset` grows by `spike_skip` at each spike rollback.
"""
import contextlib
import dataclasses
import hashlib
import inspect
import json
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from absl import flags, logging
from flax import linen as nn
from ml_collections import config_flags

import models
import optim
import sharding
from experiments import checkpointing, cli, data, spikes, train_lib
from experiments.configs import lm
from models import pipeline
from optim import _validate, schedules

_CONFIG = config_flags.DEFINE_config_file(
    "config", "experiments/configs/lm.py", "Config file, `path[:variant]`.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder: checkpoints, metrics, plots.")
_MULTIHOST = flags.DEFINE_bool("multihost", False, "Call jax.distributed.initialize() first.")

LOSS_SCALES = ("auto", "none", "dynamic")
# Dense bf16 peak FLOP/s per device, by a substring of `device.device_kind`, for MFU.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "TPU v6": 918e12,
              "TPU v5p": 459e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v4": 275e12}
METRICS_FILE, CONFIG_FILE, PLOT_FILE, CHECKPOINT_DIR = (
    "metrics.jsonl", "config.json", "loss.png", "checkpoints")


# ----------------------------------------------------------------------------- set-up


def validate(config):
    """Checks the scalar fields; ValueError naming the field and its value."""
    for name in ("steps", "batch_size", "seq_len", "log_every", "grad_accum", "eval_batches",
                 "microbatches",
                 "keep_checkpoints", "spike_window", "spike_patience"):
        _validate.positive_int(f"config.{name}", config[name])
    for name in ("seed", "eval_every", "checkpoint_every", "spike_skip"):
        _validate.non_negative_int(f"config.{name}", config[name])
    _validate.learning_rate(config.optimizer.learning_rate, "config.optimizer.learning_rate")
    _validate.one_of("config.zero", config.zero, sharding.partition.ZERO_STAGES)
    _validate.one_of("config.loss_scale", config.loss_scale, LOSS_SCALES)
    _validate.non_negative("config.clip_norm", config.clip_norm)
    _validate.non_negative("config.peak_flops", config.peak_flops)
    _validate.in_range("config.ema_decay", config.ema_decay)
    _validate.greater_than("config.spike_factor", config.spike_factor, 1)
    if not isinstance(config.average_from_step, int) or config.average_from_step < -1:
        raise ValueError(f"config.average_from_step must be -1 (off) or a step >= 0, got "
                         f"{config.average_from_step!r}")


def build_schedule(config):
    """`optim.schedules.<schedule.name>(**args)` from the schedule fields that are set;
    `peak_value` (`value` for constant) defaults to optimizer.learning_rate and
    `total_steps` to steps."""
    name = config.schedule.name
    if name not in lm.SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; known: {', '.join(lm.SCHEDULES)}")
    function = getattr(schedules, name)
    accepted = inspect.signature(function).parameters
    args = {key: value for key, value in config.schedule.items()
            if key != "name" and value is not None}
    unknown = sorted(set(args) - set(accepted) - {"peak_value"})
    if unknown:
        raise ValueError(f"schedule {name!r} takes no {unknown[0]} (config.schedule."
                         f"{unknown[0]}={args[unknown[0]]!r}; set it to None)")
    peak = args.pop("peak_value", config.optimizer.learning_rate)
    args["value" if "value" in accepted else "peak_value"] = peak
    if "total_steps" in accepted:
        args.setdefault("total_steps", config.steps)
    missing = [key for key, arg in accepted.items()
               if arg.default is inspect.Parameter.empty and key not in args]
    if missing:
        raise ValueError(f"schedule {name!r} needs config.schedule.{missing[0]}")
    return function(**args)


def _path_keys(path):
    return {str(getattr(key, "key", getattr(key, "name", key))) for key in path}


def no_decay_mask(keys):
    """A weight-decay `mask`: False for leaves with any path key in the comma list `keys`."""
    skipped = {key.strip() for key in keys.split(",") if key.strip()}

    def mask(params):
        return jax.tree.map_with_path(lambda path, _: not _path_keys(path) & skipped, params)

    return mask


def _coerce(name, value, default):
    """A dtype given by name on the command line, for an argument whose default is a dtype."""
    if isinstance(value, str) and default is not None and not isinstance(
            default, (str, bool, int, float)):
        try:
            return jnp.dtype(value)
        except TypeError:
            raise ValueError(f"config.optimizer.{name} must be a dtype name, got "
                             f"{value!r}") from None
    return value


def build_optimizer(config, schedule):
    """`optim.create(optimizer.name, **set hparams)` with the schedule as learning rate,
    `mask` from no_decay and `muon_mask` from muon_exclude (where the optimizer takes them),
    preceded by global-norm clipping when clip_norm > 0."""
    cfg = config.optimizer
    name = cfg.name
    if name not in optim.available() or not hasattr(optim, name):
        known = [n for n in optim.available() if hasattr(optim, n)]
        raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(known)}")
    accepted = inspect.signature(getattr(optim, name)).parameters
    hparams = {key: value for key, value in cfg.items()
               if key not in ("name", "no_decay", "muon_exclude") and value is not None}
    hparams = {key: _coerce(key, value, accepted[key].default if key in accepted else None)
               for key, value in hparams.items()}
    unknown = sorted(set(hparams) - set(accepted))
    if unknown:
        raise ValueError(f"optimizer {name!r} takes no {', '.join(unknown)} (unset with "
                         f"--config.optimizer.{unknown[0]}=None); it takes "
                         f"{', '.join(accepted)}")
    hparams["learning_rate"] = schedule
    if hparams.get("adam_learning_rate") is not None:
        # Muon's AdamW leaves: the same schedule shape, peaking at adam_learning_rate.
        adam_peak = hparams["adam_learning_rate"]
        _validate.learning_rate(adam_peak, "config.optimizer.adam_learning_rate")
        if cfg.learning_rate:
            ratio = adam_peak / cfg.learning_rate
            hparams["adam_learning_rate"] = lambda step: ratio * schedule(step)
    if "mask" in accepted and cfg.no_decay:
        hparams["mask"] = no_decay_mask(cfg.no_decay)
    if "muon_mask" in accepted:
        exclude = tuple(key.strip() for key in cfg.muon_exclude.split(",") if key.strip())
        hparams["muon_mask"] = optim.hidden_matrices(exclude=exclude)
    tx = optim.create(name, **hparams)
    if sharding.parse_mesh_spec(config.mesh)[sharding.STAGE] > 1:
        pipeline.check_optimizer(name)
        tx = pipeline.per_layer(tx)   # stacked blocks: the layer axis is a batch axis
    return train_lib.with_clipping(tx, config.clip_norm)


def build_loss_scale(config, policy):
    """Dynamic loss scaling when asked, or with "auto" when any policy dtype is float16."""
    dtypes = (policy.param_dtype, policy.compute_dtype, policy.output_dtype)
    if config.loss_scale == "dynamic" or (
            config.loss_scale == "auto" and np.dtype(np.float16) in dtypes):
        return optim.DynamicLossScale()
    return optim.NoOpLossScale()


def build_model_config(config):
    """The TransformerConfig: config.model, vocab 256 (bytes), policy from precision."""
    fields = dict(config.model.items())
    known = {f.name for f in dataclasses.fields(models.TransformerConfig)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"unknown model field config.model.{unknown[0]}")
    if fields["max_len"] < config.seq_len:
        raise ValueError(f"config.model.max_len ({fields['max_len']}) must be >= "
                         f"config.seq_len ({config.seq_len})")
    return models.TransformerConfig(vocab_size=256, policy=config.precision, **fields)


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


@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything a run needs, built and validated from a config before any file is written."""
    config: Any
    corpus: data.Corpus
    mesh: Any
    model_config: models.TransformerConfig
    n_params: int
    init: Any              # key -> state, jitted onto the mesh
    abstract_state: Any    # ShapeDtypeStructs with the state's shardings
    train_step: Any        # sharding.jit_train_step(...)
    eval_step: Any         # jitted (params, batch) -> loss
    eval_batch: Any        # global uint8 [eval_batches, batch_size, seq_len + 1] array
    signature: str
    flops_per_token: float
    peak_flops: float | None

    @contextlib.contextmanager
    def in_mesh(self):
        """The mesh and logical-axis rules, for model code run outside `train_step`."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(sharding.RULES):
            yield


def setup(config):
    """Validates `config` and builds the corpus, mesh, model, optimizer and jitted steps.

    Raises ValueError (naming the bad value) for anything wrong with the config.
    """
    validate(config)
    mesh = sharding.make_mesh(config.mesh)
    data_parallel = mesh.shape[sharding.DATA] * mesh.shape[sharding.FSDP]
    if config.batch_size % data_parallel:
        raise ValueError(f"config.batch_size {config.batch_size} is not divisible by the "
                         f"data-parallel size {data_parallel} of mesh {config.mesh!r}")
    if config.batch_size % jax.process_count():
        raise ValueError(f"config.batch_size {config.batch_size} is not divisible by the "
                         f"{jax.process_count()} processes")
    corpus = data.load_corpus(config.corpus, config.valid_fraction)
    data.check_length(corpus, config.seq_len)
    model_config = build_model_config(config)
    model = models.Transformer(model_config)
    if mesh.shape[sharding.STAGE] > 1:   # pipeline: microbatches per batch_size rows
        pipeline.check_divisible(model_config.n_layers, mesh.shape[sharding.STAGE],
                                 config.batch_size, config.microbatches)
        model = pipeline.Pipelined(model_config, config.microbatches)
    policy = models.get_policy(config.precision)
    schedule = build_schedule(config)
    tx = build_optimizer(config, schedule)
    loss_scale = build_loss_scale(config, policy)

    dummy = jnp.zeros((1, config.seq_len), jnp.int32)

    def init(key):
        params = nn.unbox(model.init(key, dummy))["params"]
        return train_lib.init_state(params, tx, loss_scale, config.ema_decay,
                                    config.average_from_step)

    key = jax.random.key(config.seed)
    boxed = jax.eval_shape(model.init, key, dummy)["params"]
    abstract = jax.eval_shape(init, key)
    params = abstract["params"]
    param_sh = sharding.param_shardings_for_zero(
        params, sharding.logical_to_shardings(boxed, mesh), config.zero)
    replicated = sharding.replicated(mesh)
    state_sh = {
        "step": replicated, "skipped": replicated, "params": param_sh,
        "loss_scale": jax.tree.map(lambda _: replicated, abstract["loss_scale"]),
        "opt_state": sharding.optimizer_state_shardings(tx, params, param_sh, config.zero)}
    if config.offload_optimizer_state:
        state_sh["opt_state"] = sharding.host_offload(state_sh["opt_state"])
    for key_name in ("ema", "average"):
        if key_name in abstract:
            state_sh[key_name] = sharding.follow_param_shardings(abstract[key_name], params,
                                                                 param_sh)
    abstract_state = jax.tree.map(
        lambda leaf, sh: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sh),
        abstract, state_sh)

    loss_fn = sharding.with_sharded_gradients(  # ZeRO-2/3: reduce-scattered gradients
        train_lib.lm_loss(model), param_sh,
        sharding.gradient_shardings(params, param_sh, config.zero))
    batch_sh = sharding.batch_sharding(mesh, batch_dim=1)
    train_step = sharding.jit_train_step(
        train_lib.make_train_step(loss_fn, tx, schedule, config.ema_decay,
                                  config.average_from_step),
        mesh, state_sh, batch_sh)
    eval_step = jax.jit(train_lib.make_eval_step(loss_fn), in_shardings=(param_sh, batch_sh),
                        out_shardings=replicated)
    eval_rows = data.sample_batch(
        corpus.valid, config.seed, 0, config.batch_size, config.seq_len,
        micro_batches=config.eval_batches, process_index=jax.process_index(),
        process_count=jax.process_count(), stream=data.EVAL_STREAM)
    return Setup(
        config=config, corpus=corpus, mesh=mesh, model_config=model_config,
        n_params=models.count_params(params),
        init=jax.jit(init, out_shardings=state_sh), abstract_state=abstract_state,
        train_step=train_step, eval_step=eval_step,
        eval_batch=sharding.shard_batch(eval_rows, mesh, batch_dim=1),
        signature=state_signature(abstract_state),
        flops_per_token=models.flops_per_token(model_config, config.seq_len),
        peak_flops=_peak_flops(config))


# ----------------------------------------------------------------------------- metrics


class MetricsLog:
    """DIR/metrics.jsonl, written by process 0: one JSON object per line, flushed each row."""

    def __init__(self, path, enabled=True):
        self.path, self.enabled = path, enabled

    def rows(self):
        """Every complete row (a line cut short by a kill is skipped)."""
        if not os.path.exists(self.path):
            return []
        rows = []
        with open(self.path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return rows

    def truncate(self, step):
        """Drops the rows after `step` (atomically), so the log matches a restored state."""
        if not self.enabled or not os.path.exists(self.path):
            return
        kept = [row for row in self.rows() if row["step"] <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in kept)
        os.replace(tmp, self.path)

    def write(self, row):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")


def plot_losses(rows, path):
    """Training and eval losses against step, saved as a PNG."""
    import matplotlib  # here, not at the top: a bad flag should fail without loading it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, style in (("loss", "-"), ("eval_loss", "o-"), ("eval_loss_ema", "s--"),
                       ("eval_loss_avg", "^--")):
        points = [(row["step"], row[key]) for row in rows if row.get(key) is not None]
        if points:
            ax.plot(*zip(*points), style, label=key, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / byte)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


# ----------------------------------------------------------------------------- the run


def _write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, default=str)
    os.replace(tmp, path)


class Run:
    """One training run in a workdir: resumes, trains, logs, checkpoints, rolls back.

    Opening a run checks that a checkpoint already in `workdir` belongs to the same state
    structure (ValueError otherwise) and writes nothing.
    """

    def __init__(self, setup_, workdir):
        self.s, self.config, self.workdir = setup_, setup_.config, workdir
        self.is_main = jax.process_index() == 0
        self.checkpoints = checkpointing.Checkpoints(os.path.join(workdir, CHECKPOINT_DIR),
                                                     self.config.keep_checkpoints)
        self.metrics = MetricsLog(os.path.join(workdir, METRICS_FILE), self.is_main)
        latest = self.checkpoints.latest_step()
        if latest is not None:
            signature = self.checkpoints.read_meta(latest).get("signature")
            if signature != self.s.signature:
                raise ValueError(
                    f"workdir {workdir!r} holds a checkpoint (step {latest}) of a different "
                    "model / optimizer state; use a new --workdir or the original config")

    # -- state and metadata

    def _fresh(self):
        return self.s.init(jax.random.key(self.config.seed)), {
            "step": 0, "data_offset": 0, "rollbacks": 0, "spike": {}}

    def _restore(self, step):
        if step is None:
            return self._fresh()
        return self.checkpoints.restore(step, self.s.abstract_state)

    def _meta(self, step, data_offset, rollbacks, monitor):
        return {"step": step, "data_offset": data_offset, "rollbacks": rollbacks,
                "spike": monitor.state(), "signature": self.s.signature,
                "corpus_sha256": self.s.corpus.sha256}

    def _batch(self, position):
        cfg = self.config
        rows = data.sample_batch(
            self.s.corpus.train, cfg.seed, position, cfg.batch_size, cfg.seq_len,
            micro_batches=cfg.grad_accum, process_index=jax.process_index(),
            process_count=jax.process_count())
        test = cfg.testing
        if test.corrupt_from <= position < test.corrupt_from + test.corrupt_count:
            rows = np.random.default_rng(position).integers(0, 256, rows.shape, np.uint8)
        return sharding.shard_batch(rows, self.s.mesh, batch_dim=1)

    def _evaluate(self, state):
        with self.s.in_mesh():
            row = {"eval_loss": float(self.s.eval_step(state["params"], self.s.eval_batch))}
            if "ema" in state:
                row["eval_loss_ema"] = float(self.s.eval_step(state["ema"], self.s.eval_batch))
            if "average" in state and int(state["average"].count) > 0:
                row["eval_loss_avg"] = float(
                    self.s.eval_step(state["average"].average, self.s.eval_batch))
        return row

    def _write_config(self):
        if not self.is_main:
            return
        corpus = self.s.corpus
        _write_json(os.path.join(self.workdir, CONFIG_FILE), {
            "config": self.config.to_dict(),
            "corpus": {"path": corpus.path, "bytes": corpus.n_bytes, "sha256": corpus.sha256,
                       "documents": corpus.n_documents, "train_bytes": int(corpus.train.size),
                       "valid_bytes": int(corpus.valid.size)},
            "model": dataclasses.asdict(self.s.model_config), "params": self.s.n_params,
            "flops_per_token": self.s.flops_per_token,
            "mesh": dict(self.s.mesh.shape), "devices": jax.device_count(),
            "device_kind": jax.devices()[0].device_kind})

    # -- the loop

    def train(self, progress=True):
        """Trains to `config.steps` (resuming if possible); returns a summary dict."""
        cfg = self.config
        os.makedirs(self.workdir, exist_ok=True)
        self._write_config()
        latest = self.checkpoints.latest_step()
        state, meta = self._restore(latest)
        step = int(meta["step"])
        data_offset, rollbacks = meta["data_offset"], meta["rollbacks"]
        monitor = spikes.SpikeMonitor(cfg.spike_factor, cfg.spike_window, cfg.spike_patience)
        monitor.load(meta["spike"])
        self.metrics.truncate(step)
        if step:
            logging.warning("resuming %s from step %d", self.workdir, step)

        tokens_per_step = cfg.grad_accum * cfg.batch_size * cfg.seq_len
        bar = tqdm.tqdm(total=cfg.steps, initial=step, disable=not (progress and self.is_main),
                        unit="step", dynamic_ncols=True)
        start = time.perf_counter()
        timer = None  # (time, step) of the last rate measurement; set after compiling
        while step < cfg.steps:
            state, metrics = self.s.train_step(state, self._batch(step + data_offset))
            step += 1
            bar.update(1)
            if cfg.spike_rollback and monitor.observe(step - 1, float(metrics["loss"])):
                state, step = self._roll_back(monitor, step)
                data_offset += cfg.spike_skip  # the offset only grows: never the same batches
                rollbacks += 1
                bar.reset(total=cfg.steps)
                bar.update(step)
                continue
            if timer is None:  # the first step compiled: measure speed from here on
                jax.block_until_ready(state["step"])
                timer = (time.perf_counter(), step)

            is_eval = cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.steps)
            is_log = step % cfg.log_every == 0 or step == cfg.steps or is_eval
            is_save = (cfg.checkpoint_every and step % cfg.checkpoint_every == 0
                       or step == cfg.steps)
            if is_log:
                row = self._row(step, state, metrics, rollbacks, tokens_per_step, timer, start)
                if is_eval:
                    row.update(self._evaluate(state))
                self.metrics.write(row)
                bar.set_postfix(loss=f"{row['loss']:.3f}", lr=f"{row['lr']:.2e}",
                                tok_s=f"{row['tokens_per_sec'] or 0:.3g}")
            if is_save:
                self.checkpoints.save(step, state,
                                      self._meta(step, data_offset, rollbacks, monitor))
                if step == cfg.testing.kill_after_save:
                    os.kill(os.getpid(), signal.SIGKILL)
            if is_log or is_save:  # tokens/s counts training only, not eval or saving
                timer = (time.perf_counter(), step)
        bar.close()
        self.checkpoints.close()
        rows = self.metrics.rows() if self.is_main else []
        if self.is_main and rows:
            plot_losses(rows, os.path.join(self.workdir, PLOT_FILE))
        return self._summary(rows, step, rollbacks, time.perf_counter() - start)

    def _roll_back(self, monitor, step):
        """Restores the latest checkpoint from before the spike (or the initial state),
        deletes later checkpoints and metrics rows; returns (state, its step)."""
        good = max((s for s in self.checkpoints.steps() if s <= monitor.first), default=None)
        logging.warning("loss spike at steps %d-%d: rolling back to step %d and skipping %d "
                        "batches", monitor.first + 1, step, good or 0, self.config.spike_skip)
        self.checkpoints.delete_after(-1 if good is None else good)
        state, meta = self._restore(good)
        monitor.load(meta["spike"])
        self.metrics.truncate(meta["step"])
        return state, int(meta["step"])

    def _row(self, step, state, metrics, rollbacks, tokens_per_step, timer, start):
        metrics = jax.device_get(metrics)
        now = time.perf_counter()
        rate = None
        if step > timer[1]:
            rate = (step - timer[1]) * tokens_per_step / (now - timer[0])
        mfu = None
        if rate and self.s.peak_flops:
            mfu = rate * self.s.flops_per_token / (self.s.peak_flops * jax.device_count())
        return {"step": step, "loss": float(metrics["loss"]), "lr": float(metrics["lr"]),
                "grad_norm": float(metrics["grad_norm"]), "tokens_per_sec": rate, "mfu": mfu,
                "loss_scale": float(metrics["loss_scale"]),
                "skipped_steps": int(state["skipped"]), "rollbacks": rollbacks,
                "wall_time": now - start}

    def _summary(self, rows, step, rollbacks, seconds):
        def last(key):
            return next((row[key] for row in reversed(rows) if key in row), None)

        rates = [row["tokens_per_sec"] for row in rows if row.get("tokens_per_sec")]
        return {"workdir": self.workdir, "steps": step, "params": self.s.n_params,
                "final_loss": last("loss"), "final_eval_loss": last("eval_loss"),
                "final_eval_loss_ema": last("eval_loss_ema"),
                "final_eval_loss_avg": last("eval_loss_avg"),
                "tokens_per_sec": float(np.median(rates)) if rates else None,
                "skipped_steps": last("skipped_steps"), "rollbacks": rollbacks,
                "seconds": seconds, "history": rows}


def train(config, workdir, progress=True):
    """Trains `config` in `workdir` (resuming from its latest checkpoint); returns a summary:
    steps, final_loss, final_eval_loss(_ema/_avg), tokens_per_sec (median), skipped_steps,
    rollbacks, seconds, params and history (the metrics.jsonl rows).

    Raises ValueError for a bad config, before anything is written.
    """
    return Run(setup(config), workdir).train(progress)


def main(argv):
    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
    if _MULTIHOST.value:
        jax.distributed.initialize()
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    config = cli.flag_value(_CONFIG)
    if not _WORKDIR.value:
        cli.fail("--workdir is required")
    with cli.usage_errors():
        run = Run(setup(config), _WORKDIR.value)
    run.train()


if __name__ == "__main__":
    cli.run(main)
