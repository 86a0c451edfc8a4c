"""K-FAC through kfac-jax: the one seam between the train job and a non-Optax optimizer.

K-FAC (Martens & Grosse 2015, https://arxiv.org/abs/1503.05671) approximates each layer's
block of the Fisher by a Kronecker product A (x) G of its input and output-gradient second
moments and preconditions the gradient by (A + dI)^-1 (x) (G + dI)^-1. ravine does not write
K-FAC again: it drives DeepMind's kfac-jax (`pip install ravine[kfac]`), whose optimizer is
not an `optax.GradientTransformation` (it owns the forward and backward passes, because it
needs each layer's inputs and output gradients). This module hides that difference:

    kfac = KfacOptimizer(loss_fn, learning_rate=1e-2, damping=1e-2)
    opt_state = kfac.init(params, key, batch)
    params, opt_state, loss = kfac.step(params, opt_state, key, batch, step)

`loss_fn(params, batch)` must register its loss with kfac-jax (`lm_loss` below does, for
softmax cross-entropy). Layers are found by kfac-jax's automatic graph scanning.

Two shims make kfac-jax 0.0.8 work with ravine; both live here and `check_kfac_jax()` fails
loudly when kfac-jax changes under them:
- jax >= 0.10 returns the bind params alone from `Primitive.get_bind_params`, where
  kfac-jax's graph matcher unpacks `(subfuns, params)`; `eval_jaxpr_eqn` accepts both.
- kfac-jax's repeated-dense block assumes a kernel's last dim is its only output dim and
  the others its input dims. Flax's attention projections are `(d_model, heads, head_dim)`
  (one input dim, two output dims): `KernelDenseBlock` splits a kernel into input and output
  dims from the layer's input and output ranks, so attention is preconditioned as the
  (d_model) x (heads * head_dim) map it is.
"""
import dataclasses
import importlib.metadata
import inspect

import jax
import jax.numpy as jnp
import optax
from absl import logging
from flax import linen as nn

from ravine import models
from ravine import optim
from ravine.experiments.runtime import builders
from ravine.experiments.runtime.state import init_state

TESTED_VERSION = "0.0.8"
# The K-FAC hyperparameters the train job and race accept (`optimizer.<name>`).
HPARAMS = ("learning_rate", "momentum", "damping", "curvature_ema", "curvature_update_period",
           "inverse_update_period", "l2_reg", "adaptive")


def _import():
    try:
        import kfac_jax  # noqa: PLC0415 - optional dependency
    except ImportError:
        raise ValueError("optimizer 'kfac' needs kfac-jax: pip install 'ravine[kfac]'") from None
    return kfac_jax


def _eval_jaxpr_eqn(eqn, in_values):
    """kfac-jax's `tag_graph_matcher.eval_jaxpr_eqn`, for both return shapes of
    `get_bind_params` (`(subfuns, params)` before jax 0.10, `params` from 0.10 on)."""
    bind_params = eqn.primitive.get_bind_params(eqn.params)
    subfuns, bind_params = bind_params if isinstance(bind_params, tuple) else ((), bind_params)
    with jax.extend.source_info_util.user_context(eqn.source_info.traceback):
        output = eqn.primitive.bind(*subfuns, *in_values, **bind_params)
    return output if isinstance(output, list) else [output]


def _kernel_dense_block_class(kfac_jax):
    from kfac_jax._src.curvature_blocks import kronecker_factored  # noqa: PLC0415

    letters = "abcdefghijklmnop"

    class KernelDenseBlock(kronecker_factored.RepeatedDenseKroneckerFactored):
        """A dense layer `y[..., out] = x[..., in] . W[in, out]` whose kernel may have
        several input dims and several output dims; its factors are A over prod(in) and
        G over prod(out)."""

        def __init__(self, layer_tag_eq, **kwargs):
            self._layer_tag_eq = layer_tag_eq  # the shape properties below read it
            x_ndim, y_ndim = len(self.inputs_shapes[0]), len(self.outputs_shapes[0])
            w_ndim = len(self.parameters_shapes[0])
            n_in = (x_ndim - y_ndim + w_ndim) // 2  # x = (lead, in), y = (lead, out)
            w = letters[:w_ndim]
            specs = [f"{w} -> ({w[:n_in]})({w[n_in:]})"]
            specs += [f"{letters[:len(s)]} -> 1({letters[:len(s)]})"
                      for s in self.parameters_shapes[1:]]  # the bias, over the out dims
            super().__init__(layer_tag_eq, parameters_specs=specs, **kwargs)

        def update_curvature_matrix_estimate(self, state, estimation_data, *args, **kwargs):
            [x], [dy] = estimation_data.primals.inputs, estimation_data.tangents.outputs
            lead = (x.ndim + dy.ndim - len(self.parameters_shapes[0])) // 2
            estimation_data = dataclasses.replace(
                estimation_data,
                primals=dataclasses.replace(estimation_data.primals,
                                            inputs=(x.reshape(x.shape[:lead] + (-1,)),)),
                tangents=dataclasses.replace(estimation_data.tangents,
                                             outputs=(dy.reshape(dy.shape[:lead] + (-1,)),)))
            return super().update_curvature_matrix_estimate(state, estimation_data, *args,
                                                            **kwargs)

    return KernelDenseBlock


def check_kfac_jax():
    """Installs the shims; raises RuntimeError when kfac-jax no longer has what they patch
    (a newer release: re-check the shims against it and update TESTED_VERSION)."""
    kfac_jax = _import()
    from kfac_jax._src import tag_graph_matcher  # noqa: PLC0415

    version = importlib.metadata.version("kfac-jax")
    if version != TESTED_VERSION:
        raise RuntimeError(f"kfac-jax {version} is installed; ravine's shims were written "
                           f"for {TESTED_VERSION} (experiments/runtime/kfac.py): check them")
    if not hasattr(tag_graph_matcher, "eval_jaxpr_eqn"):
        raise RuntimeError("kfac-jax's tag_graph_matcher.eval_jaxpr_eqn is gone")
    tag_graph_matcher.eval_jaxpr_eqn = _eval_jaxpr_eqn
    return kfac_jax


def lm_loss(model):
    """`loss_fn(params, tokens[B, T + 1])`: the LM's cross-entropy, registered with kfac-jax
    as softmax cross-entropy over the B * T predicted tokens (kfac-jax's batch is the B
    rows; its repeated-dense blocks average their statistics over the T positions)."""
    kfac_jax = _import()

    def loss_fn(params, tokens):
        tokens = tokens.astype(jnp.int32)
        logits = model.apply({"params": params}, tokens[:, :-1])
        targets = tokens[:, 1:]
        kfac_jax.register_softmax_cross_entropy_loss(
            logits.reshape(-1, logits.shape[-1]).astype(jnp.float32), targets.reshape(-1))
        return models.cross_entropy(logits, targets)

    return loss_fn


class KfacOptimizer:
    """kfac-jax's optimizer behind `init` / `step`, with fixed (non-adaptive) learning rate,
    momentum and damping by default so a learning-rate sweep means something.

    Args:
      loss_fn: `loss_fn(params, batch) -> scalar`, registering its loss with kfac-jax.
      learning_rate: a float or a schedule `step -> lr` (ignored when `adaptive`).
      momentum: momentum on the preconditioned direction (ignored when `adaptive`).
      damping: Tikhonov damping added to both Kronecker factors' product (initial damping
        when `adaptive`).
      curvature_ema: EMA decay of the factors.
      curvature_update_period: steps between factor updates.
      inverse_update_period: steps between recomputing the factors' inverses.
      l2_reg: L2 regularisation kfac-jax adds to the gradient and the curvature.
      adaptive: kfac-jax's adaptive learning rate, momentum and damping (Martens & Grosse
        2015, Sec. 6-7; extra forward passes per step).
      batch_size: `batch -> int`, the number of examples the loss averages over (default:
        the batch's leading dim).
    """

    def __init__(self, loss_fn, learning_rate=1e-2, momentum=0.9, damping=1e-2,
                 curvature_ema=0.95, curvature_update_period=1, inverse_update_period=5,
                 l2_reg=0.0, adaptive=False, batch_size=None):
        kfac_jax = check_kfac_jax()
        for name, value in (("damping", damping), ("learning_rate", learning_rate)):
            if not callable(value) and not (isinstance(value, (int, float)) and value > 0):
                raise ValueError(f"kfac {name} must be a positive number, got {value!r}")
        if not 0 <= momentum < 1:
            raise ValueError(f"kfac momentum must be in [0, 1), got {momentum!r}")
        if not 0 <= curvature_ema < 1:
            raise ValueError(f"kfac curvature_ema must be in [0, 1), got {curvature_ema!r}")
        for name, value in (("curvature_update_period", curvature_update_period),
                            ("inverse_update_period", inverse_update_period)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"kfac {name} must be a positive int, got {value!r}")
        schedule = learning_rate if callable(learning_rate) else (lambda _: learning_rate)
        fixed = {} if adaptive else dict(
            learning_rate_schedule=lambda step: jnp.asarray(schedule(step), jnp.float32),
            momentum_schedule=lambda _: jnp.asarray(momentum, jnp.float32),
            damping_schedule=lambda _: jnp.asarray(damping, jnp.float32))
        extra = {} if batch_size is None else {"batch_size_extractor": batch_size}
        self.schedule = schedule
        self._curvature_update_period = curvature_update_period
        self._adaptive = adaptive
        self._optimizer = kfac_jax.Optimizer(
            value_and_grad_func=jax.value_and_grad(loss_fn), l2_reg=l2_reg,
            use_adaptive_learning_rate=adaptive, use_adaptive_momentum=adaptive,
            use_adaptive_damping=adaptive, initial_damping=damping if adaptive else None,
            curvature_ema=curvature_ema, curvature_update_period=curvature_update_period,
            inverse_update_period=inverse_update_period, num_burnin_steps=0,
            multi_device=False, include_norms_in_stats=True, layer_tag_to_block_ctor={
                "repeated_dense": _kernel_dense_block_class(kfac_jax)},
            **fixed, **extra)

    def init(self, params, key, batch):
        """The optimizer state for `params` (traces `loss_fn` on `batch` to find layers)."""
        return self._optimizer.init(params, key, batch)

    def step(self, params, state, key, batch, step):
        """One K-FAC update: `(params, state, loss)` after it."""
        params, state, stats = self._optimizer.step(params, state, key, batch=batch,
                                                    global_step_int=step)
        return params, state, stats["loss"]

    def traced_step(self, params, state, key, batch, step):
        """`step` for use inside `jax.jit`, with a traced `step` (kfac-jax's own `step` needs
        a Python int, from which it picks its compiled variant): the variants this
        configuration can need are chosen with `lax.switch` (kfac-jax's `Optimizer._step`,
        the function its `step` calls). Returns `(params, state, stats)`."""
        period = self._curvature_update_period
        damping_interval = self._optimizer._damping_adaptation_interval  # noqa: SLF001
        variants = [(update_curvature, update_damping)
                    for update_curvature in ((True,) if period == 1 else (True, False))
                    for update_damping in ((False, True) if self._adaptive else (False,))]

        def branch(flags):
            def run(operands):
                return self._optimizer._step(*operands, None, None, None, None, *flags)  # noqa: SLF001
            return run

        index = jnp.zeros((), jnp.int32)
        if period > 1:
            index += (step % period != 0).astype(jnp.int32) * (2 if self._adaptive else 1)
        if self._adaptive:
            index += ((step + 1) % damping_interval == 0).astype(jnp.int32)
        return jax.lax.switch(index, [branch(flags) for flags in variants],
                              (params, state, key, batch))

    def registrations(self):
        """`{param path: kfac-jax block class name}` after `init`: which curvature block
        preconditions each leaf ("NaiveDiagonal" / "Diagonal" ones were not recognised as a
        dense layer by the scanner, e.g. embeddings)."""
        estimator = self._optimizer._estimator  # noqa: SLF001 - kfac-jax has no public view
        index = estimator.params_block_index
        return {jax.tree_util.keystr(path): type(estimator.blocks[i]).__name__
                for path, i in jax.tree.leaves_with_path(index)}


def kfac(learning_rate, momentum=0.9, damping=1e-2, curvature_ema=0.95,
         curvature_update_period=1, inverse_update_period=5, l2_reg=0.0, adaptive=False):
    """The train job's `optimizer.name=kfac` hyperparameters (see `KfacOptimizer`); the
    config's `optimizer.*` fields are made from this signature."""
    return dict(learning_rate=learning_rate, momentum=momentum, damping=damping,
                curvature_ema=curvature_ema, curvature_update_period=curvature_update_period,
                inverse_update_period=inverse_update_period, l2_reg=l2_reg, adaptive=adaptive)


# Config fields K-FAC's own step cannot honour, and the values it runs with.
UNSUPPORTED = {"ema_decay": 0.0, "average_from_step": -1, "clip_norm": 0.0}


# Curvature blocks that are not a layer's Kronecker factors but a plain diagonal of squared
# gradients: kfac-jax's scanner found no layer for the leaf.
UNRECOGNISED_BLOCKS = ("NaiveDiagonal", "NaiveFull")


_REPORTED = set()  # the warnings given in this process (a race builds one step per run)


def report_unfactored(registrations):
    """Logs (a warning, once per process) the param leaves kfac-jax's scanner left without a
    layer block, so a run does not silently precondition them differently; returns their
    paths."""
    paths = [path for path, block in registrations.items() if block in UNRECOGNISED_BLOCKS]
    if paths and tuple(paths) not in _REPORTED:
        _REPORTED.add(tuple(paths))
        logging.warning("K-FAC: no layer found for %s; preconditioned by kfac-jax's naive "
                        "diagonal (squared gradients) instead of Kronecker factors",
                        ", ".join(paths))
    return paths


def make_train_functions(config):
    """`builders.TrainFunctions` for `optimizer.name=kfac`: the train job's state and metrics,
    with kfac-jax's update in place of an Optax transform (its spec's `train_step`). The key
    of update s is `fold_in(key(seed), s)`, so a resumed run repeats the same K-FAC steps.
    Not supported: loss scaling (ValueError); EMA / tail averages and gradient clipping
    (kfac-jax has its own `norm_constraint`) are the spec's `unsupported` fields, which the
    train job and the race turn off with a warning (`builders.adapt_to_optimizer`)."""
    for field, off in UNSUPPORTED.items():
        if config[field] != off:
            raise ValueError(f"optimizer 'kfac' does not support config.{field}="
                             f"{config[field]!r}; set it to {off!r}")
    if config.zero >= 2 or builders.pipeline_stages(config) > 1:
        raise ValueError(f"optimizer 'kfac' runs with config.zero <= 1 and no stage axis, got "
                         f"zero={config.zero!r}, mesh={config.mesh!r}")
    fns = builders.make_train_step(config, tx=optax.identity())
    if not isinstance(fns.loss_scale, optim.NoOpLossScale):
        raise ValueError(f"optimizer 'kfac' does not support loss scaling (precision "
                         f"{config.precision!r}, loss_scale {config.loss_scale!r})")
    known = set(inspect.signature(kfac).parameters) - {"learning_rate"}
    hparams = {key: value for key, value in builders.optimizer_hparams(config).items()
               if key != "learning_rate"}
    unknown = sorted(set(hparams) - known)
    if unknown:
        raise ValueError(f"optimizer 'kfac' takes no {', '.join(unknown)} (unset with "
                         f"--config.optimizer.{unknown[0]}=None); it takes "
                         f"{', '.join(sorted(known))}")
    model = models.Transformer(fns.model_config)
    optimizer = KfacOptimizer(lm_loss(model), learning_rate=fns.schedule, **hparams)
    dummy = jnp.zeros((config.grad_accum * config.batch_size, config.seq_len + 1), jnp.int32)

    class _StateOnly:  # what the train job needs of `tx`: `init`, for state shardings
        @staticmethod
        def init(params):
            return optimizer.init(params, jax.random.key(0), dummy)

    def init(key):
        params = nn.unbox(fns.init_params(key))
        opt_state = optimizer.init(params, jax.random.fold_in(key, 1), dummy)
        report_unfactored(optimizer.registrations())  # kfac-jax has scanned the layers
        return init_state(params, opt_state, fns.loss_scale)

    def train_step(state, batch):
        tokens = batch.reshape(-1, batch.shape[-1])  # the K micro-batches as one batch
        key = jax.random.fold_in(jax.random.key(config.seed), state.step)
        params, opt_state, stats = optimizer.traced_step(
            state.params, state.opt_state, key, tokens, state.step)
        finite = jnp.isfinite(stats["loss"])
        metrics = {"loss": stats["loss"].astype(jnp.float32), "grad_norm": stats["grad_norm"],
                   "lr": jnp.asarray(fns.schedule(state.step), jnp.float32),
                   "finite": finite, "loss_scale": fns.loss_scale.loss_scale}
        return state._replace(params=params, opt_state=opt_state, step=state.step + 1), metrics

    return fns._replace(init=init, train_step=train_step, tx=_StateOnly())


# K-FAC trains through its own step, so it is registered here, beside that step, and stays
# out of `optim.available()` (which lists Optax transforms); the race and train job find it
# through `optim.spec("kfac")`. Its lr centre is measured on the tiny LM (BENCHMARKS.md).
optim.registry.register_builtin("kfac", kfac, train_step=make_train_functions, centre_lr=3e-3,
                                unsupported=UNSUPPORTED)
