r"""Step-time cost of the per-layer norms (experiments/runtime/layer_norms.py) in the train step.

Builds the train step of an lm config twice, with `config.layer_norms` on and off (same
model, optimizer, batch; state donated, as in training), and times them in interleaved
rounds in one process, so both see the same machine load. Prints seconds per step of each
(the best round, and the median) and the overhead of the norms. The norms are computed at
every step here (the train job computes them at every step too, and fetches them only on
log steps), so this is the whole cost.

    python -m ravine.experiments.benchmarks.bench_layer_norms                       # the small config, CPU
    python -m ravine.experiments.benchmarks.bench_layer_norms --variant=tiny --rounds=2 --steps=2   # smoke test
"""
import statistics

import jax
import numpy as np
from absl import flags

from ravine import optim

from ravine.experiments.runtime import builders, cli, timing
from ravine.experiments.configs import lm

_VARIANT = flags.DEFINE_enum("variant", "small", list(lm.VARIANTS), "lm config variant.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Interleaved timing rounds per setting.")
_STEPS = flags.DEFINE_integer("steps", 5, "Train steps per round.")
_OPTIMIZER = flags.DEFINE_string("optimizer", "adamw", "Optimizer (config.optimizer.name).")


def build(variant, optimizer, layer_norms):
    """(jitted donated train step, its initial state, a batch) of an lm config."""
    config = lm.get_config(variant)
    config.optimizer.name = optimizer
    config.layer_norms = layer_norms
    fns = builders.make_train_step(config)
    step = jax.jit(fns.train_step, donate_argnums=0)
    batch = np.random.default_rng(0).integers(
        0, 256, size=(config.grad_accum, config.batch_size, config.seq_len + 1), dtype=np.uint8)
    return step, jax.jit(fns.init)(jax.random.key(0)), batch


def measure(variant="small", optimizer="adamw", rounds=5, steps=5):
    """{setting: [seconds per step of each round]} for "with" and "without" the norms."""
    runs = {name: build(variant, optimizer, name == "with") for name in ("with", "without")}
    states = {}
    for name, (step, state, batch) in runs.items():
        states[name] = step(state, batch)[0]  # compiles
    times = {name: [] for name in runs}
    for _ in range(rounds):
        for name, (step, _, batch) in runs.items():
            states[name], seconds = timing.time_calls(
                lambda state, step=step, batch=batch: step(state, batch)[0], states[name], steps)
            times[name].append(seconds)
    return times


def main(argv):
    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
    if _ROUNDS.value < 1 or _STEPS.value < 1:
        cli.fail(f"--rounds and --steps must be >= 1, got {_ROUNDS.value}, {_STEPS.value}")
    if _OPTIMIZER.value not in optim.available():
        cli.fail(f"--optimizer: unknown optimizer {_OPTIMIZER.value!r}; known: "
                 f"{', '.join(optim.available())}")
    times = measure(_VARIANT.value, _OPTIMIZER.value, _ROUNDS.value, _STEPS.value)
    best = {name: min(values) for name, values in times.items()}
    median = {name: statistics.median(values) for name, values in times.items()}
    print(f"layer norms, lm:{_VARIANT.value}, {_OPTIMIZER.value}, {jax.devices()[0].platform} "
          f"x{jax.device_count()}, {_ROUNDS.value} rounds x {_STEPS.value} steps")
    print("| setting | best s/step | median s/step |")
    print("|---|---|---|")
    for name in ("without", "with"):
        print(f"| {name} norms | {best[name]:.4f} | {median[name]:.4f} |")
    print(f"overhead: {100 * (best['with'] / best['without'] - 1):+.1f}% (best), "
          f"{100 * (median['with'] / median['without'] - 1):+.1f}% (median)")


if __name__ == "__main__":
    cli.run(main)
