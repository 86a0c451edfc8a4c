r"""Step time of our first-order optimizers against optax's, on a transformer-shaped pytree.

AdEMAMix and ADOPT are timed against `optax.contrib`'s. Those optax lacks (8-bit AdamW, MARS,
AdamSAGE, cautious AdamW, Kron) are timed against our AdamW, with their state's bytes per
parameter, and so are AdEMAMix and ADOPT.

Times a jitted `update` + `apply_updates` (params and state donated) for AdamW, Lion and
SGD-Nesterov, ours and optax's, in one process with interleaved repetitions, and reports
the median ms/step and the ratio ours/optax. Elementwise optimizers are memory-bound, so it
also reports the bandwidth AdamW's step reaches (it must read p, g, m, v and write p, m, v:
7 x 4 bytes per float32 parameter) as a fraction of a measured elementwise copy's.

Each jitted call runs `--steps_per_call` steps in a `fori_loop`: dispatching one call with a
pytree of ~200 arrays costs the host longer than the whole step takes a GPU, and a real
training step pays that once for the model, loss and optimizer together. With
`--steps_per_call=1` the numbers include that dispatch.

    python -m ravine.experiments.benchmarks.bench_optimizers                    # ~27M params, d_model 512
    python -m ravine.experiments.benchmarks.bench_optimizers --d_model=32 --n_layers=1 --vocab_size=64 \
        --reps=2 --calls=2 --steps_per_call=2                 # smoke test
"""
import statistics

import jax
import jax.numpy as jnp
import optax
from absl import flags

from ravine import optim
from ravine.experiments.runtime import cli
from ravine.experiments.runtime.timing import time_calls

_D_MODEL = flags.DEFINE_integer("d_model", 512, "Model width.", lower_bound=1)
_N_LAYERS = flags.DEFINE_integer("n_layers", 6, "Transformer blocks.", lower_bound=0)
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", 8192, "Embedding and head rows.", lower_bound=1)
_D_FF = flags.DEFINE_integer("d_ff", 0, "MLP width; 0 means 4 * d_model.", lower_bound=0)
_REPS = flags.DEFINE_integer("reps", 10, "Interleaved repetitions (median is reported).",
                             lower_bound=1)
_CALLS = flags.DEFINE_integer("calls", 5, "Jitted calls timed per repetition.", lower_bound=1)
_STEPS_PER_CALL = flags.DEFINE_integer(
    "steps_per_call", 10, "Optimizer steps inside each jitted call (a fori_loop).", lower_bound=1)
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed calls per candidate before timing.",
                               lower_bound=1)
_COPY_FACTOR = flags.DEFINE_integer(
    "copy_factor", 4, "The copy-bandwidth yardsticks hold copy_factor x (number of params) floats.",
    lower_bound=1)

LEARNING_RATE = 1e-3
# name -> (ours, optax's) with the same arguments.
CANDIDATES = {
    "adamw": (lambda: optim.adamw(LEARNING_RATE, weight_decay=0.1),
              lambda: optax.adamw(LEARNING_RATE, weight_decay=0.1)),
    "lion": (lambda: optim.lion(LEARNING_RATE), lambda: optax.lion(LEARNING_RATE)),
    "sgd_nesterov": (lambda: optim.sgd(LEARNING_RATE, momentum=0.9, nesterov=True),
                     lambda: optax.sgd(LEARNING_RATE, momentum=0.9, nesterov=True)),
    "ademamix": (lambda: optim.ademamix(LEARNING_RATE, weight_decay=0.1),
                 lambda: optax.contrib.ademamix(LEARNING_RATE, weight_decay=0.1)),
    "adopt": (lambda: optim.adopt(LEARNING_RATE), lambda: optax.contrib.adopt(LEARNING_RATE)),
}

# Those of CANDIDATES also reported against our AdamW with their state's bytes (issue 33).
NEW_AGAINST_OPTAX = ("ademamix", "adopt")

# name -> ours, timed against ours AdamW (optax has no counterpart).
AGAINST_ADAMW = {
    "adamw_8bit": lambda: optim.adamw_8bit(LEARNING_RATE, weight_decay=0.1),
    "mars": lambda: optim.mars(LEARNING_RATE, weight_decay=0.1),
    "adamsage": lambda: optim.adamsage(LEARNING_RATE, weight_decay=0.1),
    # the paper's C-AdamW (Adam's direction masked, decay outside the mask), as registered
    "cautious_adamw": lambda: optim.cautious_adamw(LEARNING_RATE, weight_decay=0.1),
    "kron": lambda: optim.kron(LEARNING_RATE, weight_decay=0.1),
}


def transformer_shapes(d_model, n_layers, vocab_size, d_ff):
    """Param shapes of a pre-norm decoder: embedding, attention, MLP, norms, untied head."""
    block = {
        "attention": {name: (d_model, d_model) for name in ("query", "key", "value", "out")},
        "mlp": {"wi": (d_model, d_ff), "wo": (d_ff, d_model)},
        "norm_attention": {"scale": (d_model,)},
        "norm_mlp": {"scale": (d_model,)},
    }
    shapes = {f"block_{i}": block for i in range(n_layers)}
    shapes.update(embed={"embedding": (vocab_size, d_model)}, final_norm={"scale": (d_model,)},
                  head={"kernel": (d_model, vocab_size)})
    return shapes


def random_like(key, shapes, scale):
    """A float32 normal pytree with these shapes (tuples are leaves)."""
    leaves, treedef = jax.tree.flatten(shapes, is_leaf=lambda s: isinstance(s, tuple))
    keys = jax.random.split(key, len(leaves))
    return treedef.unflatten(
        [scale * jax.random.normal(k, shape, jnp.float32) for k, shape in zip(keys, leaves)])


def repeat_jitted(step, steps_per_call, constant):
    """`carry -> carry`: `steps_per_call` iterations of `step(i, carry, constant)` in one jit.

    The carry is donated, so it is updated in place as in a training loop.
    """

    def run(carry, constant):
        return jax.lax.fori_loop(0, steps_per_call, lambda i, c: step(i, c, constant), carry)

    jitted = jax.jit(run, donate_argnums=0)
    return lambda carry: jitted(carry, constant)


def train_step(tx):
    """`(i, (params, state), grads) -> (params, state)`: one update + apply_updates."""

    def step(i, carry, grads):
        params, state = carry
        # Grads that depend on the step, so XLA cannot hoist work on them out of the loop.
        scale = 1.0 + i.astype(jnp.float32) * 1e-6
        updates, state = tx.update(jax.tree.map(lambda g: g * scale, grads), state, params)
        return optax.apply_updates(params, updates), state

    return step


def copy_step(i, tree, scale):
    """An elementwise copy `x * scale` of every array (scale passed in, so it is not folded)."""
    del i
    return jax.tree.map(lambda x: x * scale, tree)


def main(argv):
    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
    d_ff = _D_FF.value or 4 * _D_MODEL.value
    shapes = transformer_shapes(_D_MODEL.value, _N_LAYERS.value, _VOCAB_SIZE.value, d_ff)
    params = random_like(jax.random.key(0), shapes, 0.02)
    grads = random_like(jax.random.key(1), shapes, 1e-3)
    n_params = sum(p.size for p in jax.tree.leaves(params))

    steps_per_call = _STEPS_PER_CALL.value
    # Every candidate owns its buffers: donation consumes them at each call.
    runs, carries = {}, {}
    for name, factories in CANDIDATES.items():
        for impl, factory in zip(("ours", "optax"), factories):
            tx = factory()
            own_params = jax.tree.map(jnp.copy, params)
            runs[name, impl] = repeat_jitted(train_step(tx), steps_per_call, grads)
            carries[name, impl] = (own_params, tx.init(own_params))
    for name, factory in AGAINST_ADAMW.items():
        tx = factory()
        own_params = jax.tree.map(jnp.copy, params)
        runs[name, "ours"] = repeat_jitted(train_step(tx), steps_per_call, grads)
        carries[name, "ours"] = (own_params, tx.init(own_params))
    # Bandwidth yardsticks: one large array (GPUs copy it fastest) and copy_factor copies of the
    # params tree (XLA:CPU runs independent arrays on different cores, one array on few).
    one = jnp.float32(1.0)
    copies = {"copy_array": jnp.ones((_COPY_FACTOR.value * n_params,), jnp.float32),
              "copy_tree": [jax.tree.map(jnp.copy, params) for _ in range(_COPY_FACTOR.value)]}
    for key, tree in copies.items():
        runs[key] = repeat_jitted(copy_step, steps_per_call, one)
        carries[key] = tree

    for key in runs:
        for _ in range(_WARMUP.value):
            carries[key] = runs[key](carries[key])
    seconds = {key: [] for key in runs}
    order = list(runs)
    for rep in range(_REPS.value):
        shift = rep % len(order)  # rotate so no candidate always runs first or last
        for key in order[shift:] + order[:shift]:
            carries[key], per_call = time_calls(runs[key], carries[key], _CALLS.value)
            seconds[key].append(per_call / steps_per_call)
    median = {key: statistics.median(values) for key, values in seconds.items()}

    device = jax.devices()[0]
    print(f"device: {jax.default_backend()} ({device.device_kind}), jax {jax.__version__}, "
          f"optax {optax.__version__}")
    print(f"params: {n_params / 1e6:.2f}M float32 (d_model {_D_MODEL.value}, "
          f"{_N_LAYERS.value} layers, vocab {_VOCAB_SIZE.value}, d_ff {d_ff}); "
          f"median of {_REPS.value} reps x {_CALLS.value} calls x {steps_per_call} steps")
    print(f"{'optimizer':<14}{'ours ms/step':>14}{'optax ms/step':>15}{'ours/optax':>12}")
    for name in CANDIDATES:
        ours, theirs = median[name, "ours"], median[name, "optax"]
        print(f"{name:<14}{1e3 * ours:>14.3f}{1e3 * theirs:>15.3f}{ours / theirs:>12.3f}")

    state_bytes = lambda key: sum(x.nbytes for x in jax.tree.leaves(carries[key][1]))  # noqa: E731
    # Every optimizer of issue 33 against our AdamW, with its state: also AdEMAMix and ADOPT,
    # timed against optax.contrib's above.
    for name in [*NEW_AGAINST_OPTAX, *AGAINST_ADAMW]:
        print(f"{name}: {1e3 * median[name, 'ours']:.3f} ms/step = "
              f"{median[name, 'ours'] / median['adamw', 'ours']:.3f}x ours adamw; state "
              f"{state_bytes((name, 'ours')) / n_params:.3f} bytes/param (adamw: "
              f"{state_bytes(('adamw', 'ours')) / n_params:.3f})")

    copy_bytes = 2 * 4 * _COPY_FACTOR.value * n_params  # read + write
    for key in copies:
        print(f"{key}: {copy_bytes / median[key] / 1e9:.2f} GB/s "
              f"(x * s on {copy_bytes / 8e6:.1f}M floats, read + write)")
    copy_bandwidth = copy_bytes / min(median[key] for key in copies)
    adamw_bytes = 7 * 4 * n_params  # read p, g, m, v; write p, m, v
    for impl in ("ours", "optax"):
        bandwidth = adamw_bytes / median["adamw", impl]
        print(f"adamw ({impl}): {adamw_bytes / 1e6:.1f} MB/step at {bandwidth / 1e9:.2f} GB/s "
              f"= {bandwidth / copy_bandwidth:.0%} of copy bandwidth")
    print(f"lion / adamw step time (ours): "
          f"{median['lion', 'ours'] / median['adamw', 'ours']:.3f}")


if __name__ == "__main__":
    cli.run(main)
