"""A run's set-up: config -> validated corpus, mesh, model, optimizer, jitted steps (`Setup`).

Everything is built and checked here before any file is written, so a bad config fails
(ValueError naming the value) before a workdir is touched:

    s = setup.setup(lm.get_config("tiny"))
    state = s.init(jax.random.key(0))
    state, metrics = s.train_step(state, loop.batch_at(s, 0))
"""
import contextlib
import dataclasses
import hashlib
from typing import Any

import jax
from flax import linen as nn

from ravine import models, optim, sharding
from ravine.experiments.runtime import builders, data, token_files, train_lib
from ravine.experiments.runtime.state import TrainState

# Dense bf16 peak FLOP/s per device, by a substring of `device.device_kind`, for MFU.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "TPU v6": 918e12,
              "TPU v5p": 459e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v4": 275e12}


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


# State trees the train config's `offload` may keep in host memory between steps.
OFFLOADABLE = ("optimizer_state", "params")


def offload_trees(config):
    """The state trees `config` keeps in host memory ("pinned_host"), in `OFFLOADABLE` order:
    the comma-separated names of `config.offload`, plus "optimizer_state" when
    `config.offload_optimizer_state` (the older, one-tree spelling of the same knob).

    Raises ValueError naming an unknown tree, or "gradients" with why it is not offered."""
    names = {name.strip() for name in config.get("offload", "").split(",") if name.strip()}
    if config.offload_optimizer_state:
        names.add("optimizer_state")
    if "gradients" in names:
        raise ValueError(
            "config.offload: 'gradients' is not offered: the gradients are temporaries of "
            "one step (no state between steps), and with jax 0.10 an array moved to host "
            f"memory inside the step must come back before any arithmetic; offload "
            f"{list(OFFLOADABLE)}")
    unknown = names - set(OFFLOADABLE)
    if unknown:
        raise ValueError(f"config.offload must name trees among {list(OFFLOADABLE)} "
                         f"(comma-separated), got {config.offload!r}")
    return tuple(name for name in OFFLOADABLE if name in names)


def train_state_layout(abstract, boxed_params, tx, mesh, zero, offload=()):
    """`(abstract_state, state_shardings)` of the `TrainState` `abstract` (shapes) around
    params `boxed_params` (shapes with logical axis names) on `mesh`: params by their
    logical axes (also split over `data` at ZeRO-3), optimizer state, EMA and tail average
    following them (the optimizer state split over `data` from ZeRO-1 on); the trees named
    in `offload` ("params", "optimizer_state") in host memory."""
    params = abstract.params
    param_sh = sharding.param_shardings_for_zero(
        params, sharding.logical_to_shardings(boxed_params, mesh), zero)
    replicated = sharding.replicated(mesh)
    opt_sh = sharding.optimizer_state_shardings(tx, params, param_sh, zero)

    def follow_params(tree):  # EMA / tail average: None when the run keeps none
        return None if tree is None else sharding.follow_param_shardings(tree, params,
                                                                         param_sh)

    def placed(name, tree):
        return sharding.host_offload(tree) if name in offload else tree

    state_sh = TrainState(
        step=replicated, skipped=replicated, params=placed("params", param_sh),
        loss_scale=jax.tree.map(lambda _: replicated, abstract.loss_scale),
        opt_state=placed("optimizer_state", opt_sh),
        ema=follow_params(abstract.ema), average=follow_params(abstract.average))
    abstract_state = jax.tree.map(
        lambda leaf, sh: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sh),
        abstract, state_sh)
    return abstract_state, state_sh


def state_layout(fns, mesh, zero, offload=()):
    """`train_state_layout` of `builders.make_train_step`'s state (`fns`) on `mesh`.
    `offload`: tree names (see `offload_trees`); True means ("optimizer_state",)."""
    if isinstance(offload, bool):
        offload = ("optimizer_state",) if offload else ()
    key = jax.random.key(0)
    return train_state_layout(jax.eval_shape(fns.init, key),
                              jax.eval_shape(fns.init_params, key), fns.tx, mesh, zero,
                              offload)


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
    hardware_flops_per_token: float | None = None   # + remat's recomputation (for HFU)

    @contextlib.contextmanager
    def in_mesh(self):
        """The mesh and logical-axis rules, for model code run outside `train_step`."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(sharding.RULES):
            yield


def setup(config):
    """Validates `config` and builds the corpus, mesh, model, optimizer and jitted steps.

    Config fields the optimizer cannot honour (its spec's `unsupported`, e.g. K-FAC's
    clipping) are set to what it runs with, one warning line each; `Setup.config` is that
    config, the one a checkpoint records.

    Raises ValueError (naming the bad value) for anything wrong with the config.
    """
    config = builders.adapt_to_optimizer(config)  # what the optimizer cannot honour, off
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
    abstract_state, state_sh = state_layout(fns, mesh, config.zero, offload_trees(config))
    if config.zero >= 2:  # ZeRO-2/3: gradients reduce-scattered onto each device's shard
        if fns.step_for_loss is None:
            raise ValueError(f"config.zero={config.zero}: optimizer "
                             f"{config.optimizer.name!r} takes ZeRO 0 or 1 only")
        params = abstract_state.params
        loss_fn = sharding.with_sharded_gradients(
            fns.loss_fn, state_sh.params,
            sharding.gradient_shardings(params, state_sh.params, config.zero))
        fns = fns._replace(train_step=fns.step_for_loss(loss_fn))
    batch_sh = sharding.batch_sharding(mesh, batch_dim=1)
    eval_rows = data.sample_batch(
        corpus.valid, config.seed, 0, config.batch_size, config.seq_len,
        micro_batches=config.eval_batches, process_index=jax.process_index(),
        process_count=jax.process_count(), stream=data.EVAL_STREAM)

    return Setup(
        config=config, corpus=corpus, mesh=mesh, model_config=fns.model_config,
        n_params=models.count_params(abstract_state.params),
        init=jax.jit(fns.init, out_shardings=state_sh),
        init_from_params=jax.jit(lambda params: _state_around(fns, config, params),
                                 out_shardings=state_sh),
        abstract_state=abstract_state,
        train_step=sharding.jit_train_step(fns.train_step, mesh, state_sh, batch_sh),
        eval_step=jax.jit(_on_device(fns.eval_step, state_sh.params),
                          in_shardings=(state_sh.params, batch_sh),
                          out_shardings=sharding.replicated(mesh)),
        eval_params=(fns.eval_params if fns.eval_params is train_lib.params_of else
                     jax.jit(_on_device(fns.eval_params, state_sh.params, state_sh.opt_state),
                             out_shardings=state_sh.params)),
        eval_batch=sharding.shard_batch(eval_rows, mesh, batch_dim=1),
        signature=state_signature(abstract_state),
        flops_per_token=models.flops_per_token(fns.model_config, config.seq_len),
        peak_flops=_peak_flops(config),
        hardware_flops_per_token=models.accounting.hardware_flops_per_token(
            fns.model_config, config.seq_len),
        loss_scaled=not isinstance(fns.loss_scale, optim.NoOpLossScale))


def _on_device(fn, *shardings):
    """`fn` whose leading arguments (laid out as `shardings`) are first copied to device
    memory where they live in host memory (`config.offload`): jax computes on neither
    "pinned_host" arrays nor a mix of memories."""
    def wrapped(*args):
        moved = [sharding.offload.to_device(a, s) for a, s in zip(args, shardings)]
        return fn(*moved, *args[len(shardings):])
    return wrapped


def _state_around(fns, config, params):
    return train_lib.init_state(params, fns.tx, fns.loss_scale, config.ema_decay,
                                config.average_from_step)


