"""Workloads as objects: a model, its data, its loss, an eval metric, a step budget, a target.

The benchmark job (`ravine-bench`, `experiments.bench`) tunes optimizers on workloads it
looks up here by name:

    from ravine.experiments import workloads

    workloads.available()            # ["noisy_quadratic", "digits_mlp", ..., "lm_tiny", ...]
    wl = workloads.get("digits_mlp")
    params = wl.init(jax.random.key(0))
    loss = wl.loss_fn(params, wl.batch(seed=0, step=0))
    error = wl.eval(params)          # test error: lower is better

A user's module registers more (`--workload_module=my_workloads` in the benchmark job, as
`--optimizer_module` in the train job); no ravine file is edited:

    def tiny():
        return workloads.Workload(name="tiny", description="...", init=..., loss_fn=...,
                                  batch=..., eval=..., steps=100, batch_size=8, n_params=16,
                                  data="...")

    workloads.register("tiny", tiny)

Built in (each description states its size, budget and data):

- `noisy_quadratic`: noisy least squares with condition number 100; the optimum is known,
  so the metric is the exact excess risk.
- `digits_mlp`, `digits_cnn`: classifiers on scikit-learn's 8x8 digits (1,797 images shipped
  with the package, no download), a fixed 1,347 / 450 train / test split; metric test error.
- `digits_autoencoder`: the deep autoencoder (Hinton & Salakhutdinov 2006; Martens 2010 and
  K-FAC's classic benchmark) on the same digits; metric test reconstruction error.
- `lm_<size>` for each size of `LM_LADDER`: the byte-level Transformer LM on the default
  corpus (the Python standard library's source), budget 20 tokens per parameter
  (Chinchilla's 1x); metric eval loss (nats per byte). Only `lm_tiny` is in the smoke preset.
"""
import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from sklearn.datasets import load_digits

from ravine import models
from ravine.experiments.runtime import data as lm_data
from ravine.experiments.runtime import train_lib


class Workload(NamedTuple):
    """A training problem the benchmark tunes optimizers on.

    Attributes:
      name: the registered name.
      description: size, budget and data in one paragraph (printed in the report).
      init: `init(key) -> params`, a pytree of float arrays.
      loss_fn: `loss_fn(params, batch) -> scalar` mean training loss of a batch.
      batch: `batch(seed, step) -> batch`, a pytree of numpy arrays: the training batch of
        step `step` of a run with seed `seed`; deterministic and seekable (any step on its
        own, in any order).
      eval: `eval(params) -> scalar`, the metric the targets are set on (lower is better:
        a held-out loss or error); a pure JAX function (jit / vmap-able) with its data
        closed over.
      steps: the step budget.
      batch_size: examples per step.
      n_params: scalars in the params.
      data: where the data comes from, in words.
      metric: what `eval` returns, in words (e.g. "test error").
      target: the metric to reach; None: the benchmark sets it from its tuned baseline.
      logits_fn: `logits_fn(params, batch) -> logits[..., classes]` of the batch's inputs,
        for optimizers that sample labels from the model (Sophia's GNB); None if there are
        no logits.
      examples_per_step: loss terms a step averages (tokens for an LM; default batch_size).
      batched_steps: whether the benchmark may batch the steps of its trials: the trials
        side by side under `jax.vmap`, a chunk of steps in one `lax.scan` (the default).
        False: each trial alone, one compiled step per call, through programs the trials
        share, for models that XLA compiles badly batched (a conv net on XLA:CPU).
    """
    name: str
    description: str
    init: Callable[[Any], Any]
    loss_fn: Callable[[Any, Any], Any]
    batch: Callable[[int, int], Any]
    eval: Callable[[Any], Any]
    steps: int
    batch_size: int
    n_params: int
    data: str
    metric: str = "eval loss"
    target: float | None = None
    logits_fn: Callable[[Any, Any], Any] | None = None
    examples_per_step: int | None = None
    batched_steps: bool = True


_FACTORIES: dict[str, Callable[[], Workload]] = {}   # name -> factory, registration order
_BUILTIN: set[str] = set()


def _check_name(name):
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"workload name must be an identifier (letters, digits, _), "
                         f"got {name!r}")


def register(name: str, factory: Callable[[], Workload]) -> Callable[[], Workload]:
    """Makes `get(name)` return `factory()`.

    Args:
      name: a new identifier (it names files: DIR/runs/<workload>/...).
      factory: `factory() -> Workload`, called by `get` (so a workload's data is loaded only
        when it is benchmarked).

    Returns:
      `factory` (so `functools.partial(register, name)` works as a decorator).

    Raises:
      ValueError: a bad or taken name (naming the taken ones), a factory not callable.
    """
    _check_name(name)
    if name in _FACTORIES:
        raise ValueError(f"workload name {name!r} is already taken; taken: "
                         f"{', '.join(_FACTORIES)}")
    if not callable(factory):
        raise ValueError(f"factory for workload {name!r} must be callable, got {factory!r}")
    _FACTORIES[name] = factory
    return factory


def unregister(name: str) -> None:
    """Removes a name added by `register` (the built-in ones stay)."""
    if name not in _FACTORIES or name in _BUILTIN:
        user = [n for n in _FACTORIES if n not in _BUILTIN]
        raise ValueError(f"{name!r} was not added by register; registered: "
                         f"{', '.join(user) or 'none'}")
    del _FACTORIES[name]


def available() -> list[str]:
    """The registered workload names: built-ins first, then the user's, in order."""
    return list(_FACTORIES)


def get(name: str) -> Workload:
    """The workload `name` (built by its factory); ValueError listing the known names."""
    if name not in _FACTORIES:
        raise ValueError(f"unknown workload {name!r}; known: {', '.join(_FACTORIES)}")
    workload = _FACTORIES[name]()
    if not isinstance(workload, Workload):
        raise ValueError(f"the factory of workload {name!r} returned {type(workload).__name__}"
                         ", not a Workload")
    for field in ("steps", "batch_size", "n_params"):
        value = getattr(workload, field)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"workload {name!r}: {field} must be a positive integer, "
                             f"got {value!r}")
    return workload._replace(name=name)


def count(init) -> int:
    """Scalars in `init(key)`'s params, from shapes only (nothing is computed)."""
    return models.count_params(jax.eval_shape(init, jax.random.key(0)))


def _rng(seed, step, stream=0):
    return np.random.default_rng([stream, int(seed), int(step)])


# ------------------------------------------------------------------------ noisy quadratic

QUADRATIC = dict(dim=32, outputs=8, condition=100.0, noise=1.0, batch_size=16, steps=400)


def noisy_quadratic(dim=QUADRATIC["dim"], outputs=QUADRATIC["outputs"],
                    condition=QUADRATIC["condition"], noise=QUADRATIC["noise"],
                    batch_size=QUADRATIC["batch_size"], steps=QUADRATIC["steps"]) -> Workload:
    """Noisy least squares `y = x W* + noise`, `x ~ N(0, H)`, `H = diag(h)` with eigenvalues
    log-spaced from 1 down to 1 / condition, W [dim, outputs] (a matrix, so matrix
    optimizers act on it). The loss is `0.5 * mean((x W - y)^2)`, whose expectation is
    `0.5 / outputs * sum_i h_i |W_i - W*_i|^2 + 0.5 * noise^2`: the metric is its first term,
    the exact excess risk (0 at the known optimum W*). Zhang et al. 2019 ("Which Algorithmic
    Choices Matter at Which Batch Sizes?", https://arxiv.org/abs/1907.04164) use this model.
    """
    h = condition ** (-np.arange(dim) / (dim - 1))
    w_star = np.random.default_rng(1234).standard_normal((dim, outputs)).astype(np.float32)
    h32, sqrt_h = jnp.asarray(h, jnp.float32), np.sqrt(h)[:, None]

    def init(key):
        return {"w": jax.random.normal(key, (dim, outputs), jnp.float32)}

    def loss_fn(params, batch):
        x, y = batch
        return 0.5 * jnp.mean((x @ params["w"] - y) ** 2)

    def batch(seed, step):
        rng = _rng(seed, step)
        x = (rng.standard_normal((batch_size, dim)) * sqrt_h.T).astype(np.float32)
        y = (x @ w_star + noise * rng.standard_normal((batch_size, outputs))).astype(
            np.float32)
        return x, y

    def evaluate(params):
        return 0.5 / outputs * jnp.sum(h32[:, None] * (params["w"] - w_star) ** 2)

    return Workload(
        name="noisy_quadratic",
        description=(f"noisy least squares, W [{dim}, {outputs}] ({dim * outputs} params), "
                     f"condition number {condition:g}, noise std {noise:g}; {steps} steps of "
                     f"{batch_size} fresh samples; metric: exact excess risk (optimum "
                     "known)."),
        init=init, loss_fn=loss_fn, batch=batch, eval=evaluate, steps=steps,
        batch_size=batch_size, n_params=dim * outputs,
        data=f"x ~ N(0, diag(h)), h log-spaced 1..1/{condition:g}, y = x W* + noise",
        metric="excess risk")


# ------------------------------------------------------------------------------- digits

DIGITS_TEST = 450  # of 1,797 images; the rest (1,347) train


@functools.lru_cache(maxsize=1)
def digits_split():
    """scikit-learn's 8x8 digits, pixels scaled to [0, 1]: (x_train, y_train, x_test,
    y_test), a fixed permutation (seed 0) with the last 450 images held out."""
    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.target))
    x = (digits.data[order] / 16.0).astype(np.float32)
    y = digits.target[order].astype(np.int32)
    cut = len(y) - DIGITS_TEST
    return x[:cut], y[:cut], x[cut:], y[cut:]


DIGITS_DATA = ("scikit-learn's 8x8 digits (1,797 images, 10 classes), fixed split 1,347 "
               "train / 450 test")


def _digits_batch(batch_size, images=False):
    x_train, y_train, _, _ = digits_split()

    def batch(seed, step):
        rows = _rng(seed, step).integers(0, len(y_train), batch_size)
        x = x_train[rows]
        return (x.reshape(-1, 8, 8, 1) if images else x), y_train[rows]

    return batch


def _classifier(name, model, example, batch_size, steps, images, what, batched_steps=True):
    _, _, x_test, y_test = digits_split()
    x_test = x_test.reshape(-1, 8, 8, 1) if images else x_test

    def init(key):
        return nn.unbox(model.init(key, example))["params"]

    def logits_fn(params, batch):
        return model.apply({"params": params}, batch[0])

    def loss_fn(params, batch):
        return optax.softmax_cross_entropy_with_integer_labels(
            logits_fn(params, batch), batch[1]).mean()

    def evaluate(params):
        logits = model.apply({"params": params}, x_test)
        return jnp.mean(jnp.argmax(logits, -1) != y_test)

    n_params = count(init)
    return Workload(
        name=name,
        description=(f"{what} ({n_params:,} params) on the 8x8 digits; {steps} steps of "
                     f"{batch_size} images (~{steps * batch_size / 1347:.0f} epochs); metric: "
                     "test error on the 450 held-out images."),
        init=init, loss_fn=loss_fn, batch=_digits_batch(batch_size, images), eval=evaluate,
        steps=steps, batch_size=batch_size, n_params=n_params, data=DIGITS_DATA,
        metric="test error", logits_fn=logits_fn, batched_steps=batched_steps)


def digits_mlp(hidden=(128, 128), batch_size=64, steps=600) -> Workload:
    """An MLP 64 -> 128 -> 128 -> 10 (ReLU) classifying the digits; metric test error."""
    model = models.MLP(features=(*hidden, 10), activation=nn.relu)
    return _classifier("digits_mlp", model, jnp.zeros((1, 64)), batch_size, steps, False,
                       f"MLP 64-{'-'.join(map(str, hidden))}-10, ReLU")


class DigitsCNN(nn.Module):
    """Two 3x3 convolutions (16, 32 channels, ReLU), 2x2 average pooling, a linear head."""

    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(16, (3, 3))(x))
        x = nn.relu(nn.Conv(32, (3, 3))(x))
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


def digits_cnn(batch_size=64, steps=600) -> Workload:
    """A small conv net (`DigitsCNN`) classifying the digits; metric test error."""
    # Steps not batched: XLA:CPU makes the vmapped convolutions batch-grouped (a step of 15
    # AdamW trials 151.6 ms against 1.87 ms for one) and runs them inside a loop's body
    # without its fast kernels (one trial's step in a 30-step `lax.scan`: 44.8 ms against
    # 2.6 ms called one by one; any unroll short of the whole loop the same). 2 cores, batch
    # 64, 2026-12-06.
    return _classifier("digits_cnn", DigitsCNN(), jnp.zeros((1, 8, 8, 1)), batch_size, steps,
                       True, "conv net 3x3x16, 3x3x32, 2x2 avg pool, linear head",
                       batched_steps=False)


AUTOENCODER_WIDTHS = (128, 64, 32, 8)   # encoder; the decoder mirrors it back to 64 pixels


def digits_autoencoder(widths=AUTOENCODER_WIDTHS, batch_size=64, steps=1000) -> Workload:
    """The deep autoencoder of Hinton & Salakhutdinov (2006), the curvature benchmark of
    Martens (2010, Hessian-free) and K-FAC (Martens & Grosse 2015), scaled to 8x8 digits:
    64-128-64-32-8-32-64-128-64, logistic hidden units, a linear 8-unit code, logistic
    outputs trained with pixel-wise cross-entropy. Metric: test squared reconstruction error
    (summed over the 64 pixels, mean over images), the number those papers report."""
    encoder = models.MLP(features=widths, activation=nn.sigmoid)
    decoder = models.MLP(features=(*widths[-2::-1], 64), activation=nn.sigmoid)
    x_train, _, x_test, _ = digits_split()
    example = jnp.zeros((1, 64))

    def init(key):
        k1, k2 = jax.random.split(key)
        return {"encoder": nn.unbox(encoder.init(k1, example))["params"],
                "decoder": nn.unbox(decoder.init(k2, jnp.zeros((1, widths[-1]))))["params"]}

    def reconstruct(params, x):  # logits of the pixels
        code = encoder.apply({"params": params["encoder"]}, x)
        return decoder.apply({"params": params["decoder"]}, code)

    def loss_fn(params, batch):
        return optax.sigmoid_binary_cross_entropy(reconstruct(params, batch), batch).mean()

    def batch(seed, step):
        return x_train[_rng(seed, step).integers(0, len(x_train), batch_size)]

    def evaluate(params):
        error = (nn.sigmoid(reconstruct(params, x_test)) - x_test) ** 2
        return error.sum(-1).mean()

    n_params = count(init)
    shape = "-".join(map(str, (64, *widths, *widths[-2::-1], 64)))
    return Workload(
        name="digits_autoencoder",
        description=(f"deep autoencoder {shape} ({n_params:,} params; logistic units, linear "
                     f"code, cross-entropy loss) on the 8x8 digits; {steps} steps of "
                     f"{batch_size} images; metric: test squared reconstruction error "
                     "(sum over pixels, mean over the 450 held-out images)."),
        init=init, loss_fn=loss_fn, batch=batch, eval=evaluate, steps=steps,
        batch_size=batch_size, n_params=n_params, data=DIGITS_DATA,
        metric="test reconstruction error")


# ------------------------------------------------------------------------ byte-level LMs

# The LM size ladder, one recipe (pre-norm SwiGLU, RoPE, RMSNorm; d_ff the config's default),
# by width and depth, shared by the benchmark (its `scale` preset runs each rung as a
# workload) and the scaling study (`ravine-scaling`, experiments/scaling_study.py). Total
# params 5.9k..108k (18x), non-embedding 1.8k..83k (46x); `ladder_table()` lists them with
# FLOPs per token. The middle rungs small, compact, medium and wide share depth 2 and 2 heads,
# so they are also a width ladder (16..48, 3x) for learning-rate transfer. mini, compact and
# wide (added for the scaling study) put ~1.6x between neighbours, so an IsoFLOP profile has
# 5 or more sizes. Benchmark budgets are Chinchilla's 1x, 20 tokens per parameter: `steps =
# 20 * params / (batch_size * seq_len)` rounded up to a multiple of 20; the seven rungs' 1x
# training FLOPs sum to 2.7e12 (the largest 1.5e12; the four rungs before mini, compact and
# wide were added: 1.8e12). The speedup-against-size study (issue 29 item 4) planned AdamW at
# 1x, 2x and 4x plus two other optimizers at 1x, 2 seeds, ~21 1x-runs per size: ~5.6e13
# FLOPs on all seven rungs, about 60 min at ~15 GFLOP/s (45 min on the first four). A ladder
# starting at the race's 0.14M-param `tiny` config would need ~100x that.
LM_LADDER = {
    "tiny": dict(d_model=8, n_layers=1, n_heads=1, batch_size=16, seq_len=64),
    "mini": dict(d_model=12, n_layers=1, n_heads=1, batch_size=16, seq_len=64),
    "small": dict(d_model=16, n_layers=2, n_heads=2, batch_size=16, seq_len=64),
    "compact": dict(d_model=24, n_layers=2, n_heads=2, batch_size=16, seq_len=64),
    "medium": dict(d_model=32, n_layers=2, n_heads=2, batch_size=32, seq_len=64),
    "wide": dict(d_model=48, n_layers=2, n_heads=2, batch_size=32, seq_len=64),
    "large": dict(d_model=48, n_layers=3, n_heads=4, batch_size=32, seq_len=64),
}
TOKENS_PER_PARAM = 20
LM_EVAL_ROWS = 64   # held-out windows per evaluation (fixed: the same ones every eval)


def chinchilla_steps(n_params, tokens_per_step, tokens_per_param=TOKENS_PER_PARAM,
                     multiple=20):
    """Steps for `tokens_per_param` tokens per parameter, rounded up to `multiple`."""
    steps = math.ceil(tokens_per_param * n_params / tokens_per_step)
    return multiple * math.ceil(steps / multiple)


def lm_config(size, **overrides) -> tuple[models.TransformerConfig, int, int]:
    """`(TransformerConfig, batch_size, seq_len)` of ladder rung `size`; `overrides` replace
    TransformerConfig fields (e.g. `mlp="gelu", d_ff=48` or `parametrization="mup",
    base_width=16`) and may set `batch_size`. ValueError naming an unknown size."""
    if size not in LM_LADDER:
        raise ValueError(f"unknown LM ladder size {size!r}; known: {', '.join(LM_LADDER)}")
    shape = {**LM_LADDER[size], **overrides}
    batch_size, seq_len = shape.pop("batch_size"), shape.pop("seq_len")
    return models.TransformerConfig(max_len=seq_len, **shape), batch_size, seq_len


def ladder_table(sizes=None) -> list[dict]:
    """One row per rung (default: all, in order): its shape, params with embeddings (total,
    Chinchilla's N), without (Kaplan's N: `models.non_embedding_params`) and training FLOPs
    per token (`models.flops_per_token`) at its seq_len."""
    return [dict(_ladder_row(size)) for size in sizes or LM_LADDER]


@functools.lru_cache(maxsize=None)
def _ladder_row(size):
    config, batch_size, seq_len = lm_config(size)
    model = models.Transformer(config)
    params = count(lambda key: model.init(key, jnp.zeros((1, seq_len), jnp.int32)))
    return {"size": size, "d_model": config.d_model, "n_layers": config.n_layers,
            "n_heads": config.n_heads, "d_ff": config.ff_dim, "batch_size": batch_size,
            "seq_len": seq_len, "params": params,
            "non_embedding_params": models.non_embedding_params(config),
            "flops_per_token": models.flops_per_token(config, seq_len)}


def lm(size, corpus="", tokens_per_param=TOKENS_PER_PARAM, **overrides) -> Workload:
    """The byte-level Transformer LM of `LM_LADDER[size]` on `corpus` ("" = the Python
    standard library's source, `runtime.data`), at `tokens_per_param` tokens per param;
    `overrides` replace the rung's TransformerConfig fields and batch size (`lm_config`)."""
    config, batch_size, seq_len = lm_config(size, **overrides)
    model = models.Transformer(config)
    text = lm_data.load_corpus(corpus)
    lm_data.check_length(text, seq_len)
    loss_fn = train_lib.lm_loss(model)
    eval_tokens = lm_data.sample_batch(text.valid, 0, 0, LM_EVAL_ROWS, seq_len,
                                       stream=lm_data.EVAL_STREAM)[0]

    def init(key):
        return nn.unbox(model.init(key, jnp.zeros((1, seq_len), jnp.int32)))["params"]

    def batch(seed, step):
        return lm_data.sample_batch(text.train, seed, step, batch_size, seq_len)[0]

    def logits_fn(params, tokens):
        return model.apply({"params": params}, tokens[:, :-1].astype(jnp.int32))

    def evaluate(params):
        return loss_fn(params, eval_tokens)

    n_params = count(init)
    tokens_per_step = batch_size * seq_len
    steps = chinchilla_steps(n_params, tokens_per_step, tokens_per_param)
    return Workload(
        name=f"lm_{size}",
        description=(f"byte-level Transformer LM '{size}' (d_model {config.d_model}, "
                     f"n_layers {config.n_layers}, n_heads {config.n_heads}; {n_params:,} params, "
                     f"{models.non_embedding_params(config):,} non-embedding); {steps} steps "
                     f"of {batch_size} x {seq_len} tokens (~{tokens_per_param} tokens per "
                     f"param); metric: eval loss (nats / byte) on {LM_EVAL_ROWS} fixed "
                     "held-out windows."),
        init=init, loss_fn=loss_fn, batch=batch, eval=evaluate, steps=steps,
        batch_size=batch_size, n_params=n_params,
        data=f"bytes of {text.path} ({text.n_documents} documents, split by document)",
        metric="eval loss", logits_fn=logits_fn, examples_per_step=tokens_per_step)


def _register_builtin(name, factory):
    register(name, factory)
    _BUILTIN.add(name)


_register_builtin("noisy_quadratic", noisy_quadratic)
_register_builtin("digits_mlp", digits_mlp)
_register_builtin("digits_cnn", digits_cnn)
_register_builtin("digits_autoencoder", digits_autoencoder)
for _size in LM_LADDER:
    _register_builtin(f"lm_{_size}", functools.partial(lm, _size))
