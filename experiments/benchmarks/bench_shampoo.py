r"""Shampoo's step time and state size against AdamW, Muon and the reference Shampoo.

On a transformer-shaped pytree (`experiments.bench_optimizers.transformer_shapes`; by default
2 layers of width 512, vocab 2048: 8.4M params) it times, in one process with interleaved
repetitions, a jitted `update` + `apply_updates` of:

  shampoo_eigh, shampoo_newton   ours (optim.shampoo), block 512, roots every 10 steps
  shampoo_bf16                   ours, eigh, statistics in bfloat16 (not in the default list)
  shampoo_newton_bf16x6          ours, Newton roots from sums of six bfloat16 products
                                 (`newton_precision="bfloat16_6x"`: for GPUs/TPUs; not default)
  adamw, adamw_optax             optim.adamw and optax.adamw
  muon, muon_optax               optim.muon and optax.contrib.muon
  reference                      precondition-opt 0.3.0's distributed_shampoo (Anil et al.),
                                 with the same block size, root interval, betas and start

Every timed call runs `--steps_per_call` steps (default: one root interval) in a fori_loop,
so the mean ms/step includes the root recomputations. It prints the mean ms/step, the
optimizer state in MiB and the ratios to AdamW and to the reference, then where Shampoo's
time goes: statistics (the G G^T products), roots (a refresh step minus a plain one) and the
rest (preconditioning, grafting, momentum). With `--train_step` it also times a whole LM
train step (forward, backward, update; `experiments.train_lib`) with each Shampoo variant in
`--lm_shampoo` against AdamW, interleaved in the same process.

The reference is never a dependency of ravine: it is imported from `--reference_dir`, where
`pip install --no-deps --target` puts it on first use (set `--reference_dir=` to skip it).
It still calls `jax.tree_map` and friends, removed from current JAX, so the same functions
from `jax.tree` are put back under those names in this process only. Without it, the
Shampoo step is compared with the figure the issue quotes for it: 2.4 s/step on 8M params
on the 2-core CPU, 177x AdamW's step.

On CPU it runs with OPENBLAS_NUM_THREADS=1, as every script here does (see `experiments`).

    python -m ravine.experiments.benchmarks.bench_shampoo                       # CPU: 8.4M params
    python -m ravine.experiments.benchmarks.bench_shampoo --train_step          # + LM train step, Shampoo/AdamW
    python -m ravine.experiments.benchmarks.bench_shampoo --reference_dir= --train_step --lm_d_model=768 \
        --lm_layers=12 --lm_seq_len=1024 --lm_batch=16 --block_size=512 \
        --optimizers=shampoo_newton,shampoo_newton_bf16x6,adamw_optax \
        --lm_shampoo=shampoo_newton,shampoo_newton_bf16x6   # GPU: GPT-2 small's shape
    python -m ravine.experiments.benchmarks.bench_shampoo --d_model=64 --vocab_size=64 --block_size=32 \
        --precondition_every=2 --steps_per_call=2 --reps=1 --calls=1 --reference_dir= \
        --train_step --lm_d_model=32 --lm_layers=1 --lm_seq_len=16 --lm_batch=2 \
        --lm_shampoo=shampoo_eigh,shampoo_newton_bf16x6   # smoke test
"""
import functools
import importlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags
from flax import linen as nn

from ravine import models, optim
from ravine.experiments.runtime import cli, train_lib
from ravine.experiments.benchmarks.bench_optimizers import (  # (also defines the shared flags)
    random_like, repeat_jitted, train_step, transformer_shapes)
from ravine.experiments.runtime.timing import best_seconds, time_calls
from ravine.optim import _blocks

_BLOCK_SIZE = flags.DEFINE_integer("block_size", 512, "Shampoo's block size.", lower_bound=1)
_EVERY = flags.DEFINE_integer("precondition_every", 10, "Steps between root recomputations.",
                              lower_bound=1)
_OPTIMIZERS = flags.DEFINE_list(
    "optimizers", ["shampoo_eigh", "shampoo_newton", "adamw", "adamw_optax", "muon",
                   "muon_optax", "reference"], "Candidates to time (see the module docstring).")
_REFERENCE_DIR = flags.DEFINE_string(
    "reference_dir", "/tmp/ravine_bench_reference",
    "Where precondition-opt is (or gets pip-installed); empty: skip the reference.")
_TRAIN_STEP = flags.DEFINE_bool("train_step", False,
                                "Also time a whole LM train step, Shampoo against AdamW.")
_LM_D_MODEL = flags.DEFINE_integer("lm_d_model", 256, "Train step: model width.", lower_bound=1)
_LM_LAYERS = flags.DEFINE_integer("lm_layers", 4, "Train step: transformer blocks.",
                                  lower_bound=1)
_LM_SEQ_LEN = flags.DEFINE_integer("lm_seq_len", 256, "Train step: sequence length.",
                                   lower_bound=1)
_LM_BATCH = flags.DEFINE_integer("lm_batch", 32, "Train step: sequences per step.",
                                 lower_bound=1)
_LM_SHAMPOO = flags.DEFINE_list(
    "lm_shampoo", ["shampoo_eigh"],
    "Train step: the Shampoo variants to time against AdamW (shampoo_* candidate names).")

FLAGS = flags.FLAGS
# Defaults of the flags shared with bench_optimizers (d_model, n_layers, vocab_size, d_ff,
# reps, calls, steps_per_call, warmup), for this benchmark's model and window.
FLAGS.set_default("n_layers", 2)
FLAGS.set_default("vocab_size", 2048)
FLAGS.set_default("reps", 3)
FLAGS.set_default("calls", 1)

LEARNING_RATE = 1e-3
REFERENCE = "precondition-opt==0.3.0"
# The figure for the reference on 8M params on the 2-core CPU.
REFERENCE_SECONDS, REFERENCE_OVER_ADAMW = 2.4, 177.0


def load_reference(directory):
    """precondition-opt's `distributed_shampoo` module, pip-installed into `directory` on
    first use (with `jax.tree_map` & co. put back for it); None (and why) if unavailable."""
    if not directory:
        return None, "skipped (--reference_dir is empty)"
    for name in ("map", "flatten", "unflatten", "leaves", "structure"):
        if not hasattr(jax, f"tree_{name}"):
            setattr(jax, f"tree_{name}", getattr(jax.tree, name))
    if directory not in sys.path:
        sys.path.insert(0, directory)
    try:
        return importlib.import_module("precondition.distributed_shampoo"), None
    except ImportError:
        pass
    try:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                        "--target", directory, REFERENCE], check=True, timeout=300,
                       capture_output=True)
        importlib.invalidate_caches()  # the folder was listed (empty) by the import above
        return importlib.import_module("precondition.distributed_shampoo"), None
    except (subprocess.SubprocessError, OSError, ImportError) as error:
        return None, f"unavailable ({type(error).__name__}: {cli.one_line(error)[:120]})"


def check_known(flag, names, known):
    """UsageError naming the entries of list flag `--flag` that are not in `known`, or
    saying that it is empty."""
    unknown = sorted(set(names) - set(known))
    if unknown or not names:
        what = f"unknown {unknown}" if unknown else "empty"
        raise cli.UsageError(f"--{flag}: {what}; known: {', '.join(known)}")


def shampoo_variants():
    """name -> factory of our Shampoo (block and root interval from the flags)."""
    shampoo = functools.partial(optim.shampoo, LEARNING_RATE, block_size=_BLOCK_SIZE.value,
                                precondition_every=_EVERY.value)
    return {
        "shampoo_eigh": lambda: shampoo(inverse_root="eigh"),
        "shampoo_newton": lambda: shampoo(inverse_root="newton"),
        "shampoo_bf16": lambda: shampoo(statistics_dtype=jnp.bfloat16),
        "shampoo_newton_bf16x6": lambda: shampoo(inverse_root="newton",
                                                 newton_precision="bfloat16_6x"),
    }


def candidates(reference):
    """name -> optimizer factory, for the names in --optimizers that can be built here."""
    block, every = _BLOCK_SIZE.value, _EVERY.value
    factories = {
        **shampoo_variants(),
        "adamw": lambda: optim.adamw(LEARNING_RATE, weight_decay=0.1),
        "adamw_optax": lambda: optax.adamw(LEARNING_RATE, weight_decay=0.1),
        # Every 2-D leaf on Muon, as optax.contrib.muon's default routes them (ours keeps the
        # embedding and head on AdamW by default), so both do the same work.
        "muon": lambda: optim.muon(LEARNING_RATE, muon_mask=optim.hidden_matrices(exclude=())),
        "muon_optax": lambda: optax.contrib.muon(LEARNING_RATE),
    }
    if reference is not None:
        # Our defaults where the two share a meaning: betas, start, root interval, damping.
        factories["reference"] = lambda: reference.distributed_shampoo(
            LEARNING_RATE, block_size=block, beta1=0.9, beta2=0.999,
            start_preconditioning_step=10, preconditioning_compute_steps=every,
            graft_type=reference.GraftingType.RMSPROP_NORMALIZED, nesterov=False,
            generate_training_metrics=False)
    check_known("optimizers", _OPTIMIZERS.value, [*factories, "reference"])
    return {name: factories[name] for name in _OPTIMIZERS.value if name in factories}


def state_mib(state):
    return sum(x.nbytes for x in jax.tree.leaves(state)) / 2**20


def warm_up(runs, carries):
    """`--warmup` untimed calls of every run, in interleaved rounds like the timed ones (the
    first call after all the compilations is slow, whichever run it is)."""
    for _ in range(FLAGS.warmup):
        for key in runs:
            carries[key] = runs[key](carries[key])
    jax.block_until_ready(carries)


def time_interleaved(runs, carries, reps, calls, steps_per_call):
    """Mean seconds per step of each run, its calls interleaved with the others' (rotated)."""
    seconds = {key: [] for key in runs}
    order = list(runs)
    for rep in range(reps):
        shift = rep % len(order)
        for key in order[shift:] + order[:shift]:
            carries[key], per_call = time_calls(runs[key], carries[key], calls)
            seconds[key].append(per_call / steps_per_call)
    return {key: float(np.mean(values)) for key, values in seconds.items()}


def shampoo_breakdown(tx, params, grads):
    """Seconds of one Shampoo step: statistics, a root refresh, and the rest."""
    state = tx.init(params)
    update = jax.jit(tx.update)
    _, plain_state = update(grads, state, params)  # count 1: no refresh
    plain = best_seconds(update, grads, plain_state, params)
    refresh = best_seconds(update, grads, state, params)  # count 0: recomputes every root
    matrices = [g for g in jax.tree.leaves(grads) if g.ndim >= 2]

    @jax.jit
    def statistics(matrices):
        out = []
        for g in matrices:
            blocked = _blocks.to_blocks(g, _blocks.make_blocking(g.shape, _BLOCK_SIZE.value))
            out += [_blocks.gram(blocked, j, g.ndim) for j in range(g.ndim)]
        return out

    stats = best_seconds(statistics, matrices)
    return {"statistics": stats, "roots (per refresh)": refresh - plain,
            "rest": plain - stats, "plain step": plain, "refresh step": refresh}


def lm_train_steps(names):
    """Mean seconds per LM train step (forward, backward, update) for the named optimizers
    (`shampoo_variants` names and "adamw")."""
    config = models.TransformerConfig(
        d_model=_LM_D_MODEL.value, n_layers=_LM_LAYERS.value,
        n_heads=max(1, _LM_D_MODEL.value // 64), max_len=_LM_SEQ_LEN.value)
    model = models.Transformer(config)
    tokens = jax.random.randint(jax.random.key(0), (1, _LM_BATCH.value, _LM_SEQ_LEN.value + 1),
                                0, config.vocab_size)
    params = nn.unbox(model.init(jax.random.key(1), tokens[0, :, :-1]))["params"]
    loss_fn = train_lib.lm_loss(model)
    factories = {**shampoo_variants(),
                 "adamw": lambda: optim.adamw(LEARNING_RATE, weight_decay=0.1)}
    steps, carries = {}, {}
    for name in names:
        tx = factories[name]()
        step = jax.jit(train_lib.make_train_step(loss_fn, tx, lambda _: LEARNING_RATE),
                       donate_argnums=0)
        own = jax.tree.map(jnp.copy, params)
        carries[name] = train_lib.init_state(own, tx, optim.NoOpLossScale())
        steps[name] = lambda state, step=step: step(state, tokens)[0]
    n_params = sum(p.size for p in jax.tree.leaves(params))
    warm_up(steps, carries)
    window = _EVERY.value

    def run_window(step):
        def run(state):
            for _ in range(window):
                state = step(state)
            return state
        return run

    runs = {name: run_window(steps[name]) for name in names}
    mean = time_interleaved(runs, carries, FLAGS.reps, 1, window)
    return mean, n_params, config


def main(argv):
    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
    reference, why = (load_reference(_REFERENCE_DIR.value) if "reference" in _OPTIMIZERS.value
                      else (None, "not requested"))
    with cli.usage_errors():
        factories = candidates(reference)
        if _TRAIN_STEP.value:
            check_known("lm_shampoo", _LM_SHAMPOO.value, shampoo_variants())
    d_ff = FLAGS.d_ff or 4 * FLAGS.d_model
    shapes = transformer_shapes(FLAGS.d_model, FLAGS.n_layers, FLAGS.vocab_size, d_ff)
    params = random_like(jax.random.key(0), shapes, 0.02)
    grads = random_like(jax.random.key(1), shapes, 1e-3)
    n_params = sum(p.size for p in jax.tree.leaves(params))

    steps_per_call = FLAGS.steps_per_call
    runs, carries, mib = {}, {}, {}
    for name, factory in factories.items():
        tx = factory()
        own_params = jax.tree.map(jnp.copy, params)
        state = tx.init(own_params)
        mib[name] = state_mib(state)
        runs[name] = repeat_jitted(train_step(tx), steps_per_call, grads)
        carries[name] = (own_params, state)
    warm_up(runs, carries)
    mean = time_interleaved(runs, carries, FLAGS.reps, FLAGS.calls, steps_per_call)

    device = jax.devices()[0]
    print(f"device: {jax.default_backend()} ({device.device_kind}), jax {jax.__version__}")
    print(f"params: {n_params / 1e6:.2f}M float32 (d_model {FLAGS.d_model}, "
          f"{FLAGS.n_layers} layers, vocab {FLAGS.vocab_size}, d_ff {d_ff}); block "
          f"{_BLOCK_SIZE.value}, roots every {_EVERY.value} steps; mean of {FLAGS.reps} reps x "
          f"{FLAGS.calls} calls x {steps_per_call} steps")
    print(f"reference ({REFERENCE}): {'loaded' if reference is not None else why}")
    baseline = mean.get("adamw_optax", mean.get("adamw"))
    ref = mean.get("reference")
    width = max(16, *(len(name) + 2 for name in runs))
    print(f"{'optimizer':<{width}}{'ms/step':>10}{'state MiB':>11}{'x adamw':>9}"
          f"{'x reference':>13}")
    for name in runs:
        x_adamw = f"{mean[name] / baseline:9.2f}" if baseline else f"{'-':>9}"
        x_ref = f"{mean[name] / ref:13.3f}" if ref else f"{'-':>13}"
        print(f"{name:<{width}}{1e3 * mean[name]:>10.2f}{mib[name]:>11.1f}{x_adamw}{x_ref}")
    if ref is None:
        for name in ("shampoo_eigh", "shampoo_newton"):
            if name in mean:
                quoted = f"{mean[name] / REFERENCE_SECONDS:.3f}x the issue's {REFERENCE_SECONDS}"
                print(f"{name}: {quoted} s/step for the reference (8M params, 2-core CPU)"
                      + (f"; the reference is quoted at {REFERENCE_OVER_ADAMW:.0f}x AdamW, "
                         f"ours is {mean[name] / baseline:.1f}x" if baseline else ""))

    for name in ("shampoo_eigh", "shampoo_newton"):
        if name in factories:
            parts = shampoo_breakdown(factories[name](), params, grads)
            every = _EVERY.value
            per_step = {"statistics": parts["statistics"],
                        "roots": parts["roots (per refresh)"] / every, "rest": parts["rest"]}
            total = sum(per_step.values())
            print(f"{name} breakdown (ms/step, roots amortized over {every} steps): " + ", ".join(
                f"{key} {1e3 * value:.1f} ({value / total:.0%})" for key, value in
                per_step.items()) + f"; one refresh {1e3 * parts['roots (per refresh)']:.0f} ms")

    if _TRAIN_STEP.value:
        lm_mean, lm_params, config = lm_train_steps([*_LM_SHAMPOO.value, "adamw"])
        adamw = lm_mean["adamw"]
        print(f"LM train step ({lm_params / 1e6:.2f}M params: d_model {config.d_model}, "
              f"{config.n_layers} layers, batch {_LM_BATCH.value} x {_LM_SEQ_LEN.value}; "
              f"Shampoo block {_BLOCK_SIZE.value}, roots every {_EVERY.value}): adamw "
              f"{1e3 * adamw:.1f} ms")
        for name in _LM_SHAMPOO.value:
            print(f"  {name}: {1e3 * lm_mean[name]:.1f} ms, adamw {1e3 * adamw:.1f} ms, "
                  f"ratio {lm_mean[name] / adamw:.3f}")


if __name__ == "__main__":
    cli.run(main)
