r"""Throughput of a learning-rate / seed sweep, three ways, in one process.

    python -m ravine.experiments.benchmarks.bench_race                  # AdamW 5 lrs x 3 seeds, tiny LM, 100 steps
    python -m ravine.experiments.benchmarks.bench_race --steps=20 --grid_lrs=2 --grid_seeds=1 --noshampoo

The same grid is trained
  - as the race did before sweeps shared their work: a full `experiments.train` run per
    point (its own compilation, evals, checkpoint and plot in its own workdir);
  - `--sweep=loop`: `experiments.sweep` with one compiled step, the runs one after another;
  - `--sweep=vmap`: the same, all runs side by side in one vmapped program;
and each prints runs x steps / s (wall clock, compilation and evals included: the cost of
the sweep) and its ratio to the first, and the same from the process's CPU time (all
threads; on a machine shared with other jobs the wall clock inflates, the CPU time much
less). With Shampoo (default on) the loop and vmap sweeps are repeated for Shampoo
(default eigh roots): its vmap / loop time ratio against AdamW's shows whether the vmapped
program keeps Shampoo's root refreshes amortized (a batched refresh predicate would run
them every step). Every run evaluates `--run_evals` times (+ once at step 0 in the sweeps).
"""
import os
import tempfile
import time

import jax
from absl import flags, logging

from ravine.experiments.runtime import cli, loop, sweep

from ravine import optim
from ravine.experiments import race
from ravine.experiments.configs import lm

_STEPS = flags.DEFINE_integer("steps", 100, "Steps per run.")
_LR_POINTS = flags.DEFINE_integer("grid_lrs", 5, "Learning rates (2x grid around centre_lr).")
_SEEDS = flags.DEFINE_integer("grid_seeds", 3, "Seeds per learning rate.")
_EVALS = flags.DEFINE_integer("run_evals", 10, "Evaluations per run.")
_SHAMPOO = flags.DEFINE_bool("shampoo", True, "Also time Shampoo's loop and vmap sweeps.")


def config_for(name, lr, steps, evals, **hparams):
    """The tiny LM at `steps` steps, optimizer `name` at peak lr `lr` (and `hparams`)."""
    base = lm.get_config("tiny")
    base.steps = steps
    base.schedule.warmup_steps = max(1, steps // 10)
    base.checkpoint_every = steps  # one checkpoint at the end, as the old race's runs had
    config = race.run_config(base, name, lr, evals=evals)
    config.optimizer.update(hparams)
    return config


def grid(name, points, seeds):
    return [sweep.SweepRun(lr, seed) for lr in race.lr_grid(name, points, 2.0)
            for seed in range(seeds)]


def clocks():
    return time.perf_counter(), time.process_time()


def since(start):
    """(wall, cpu) seconds since `start = clocks()`."""
    return tuple(now - then for now, then in zip(clocks(), start))


def time_solo_runs(name, runs, steps, evals, folder):
    """(wall, cpu) seconds to train every run as its own experiments.train run."""
    start = clocks()
    for run in runs:
        config = config_for(name, run.lr, steps, evals)
        config.seed = run.seed
        loop.train(config, os.path.join(folder, "solo", run.key), progress=False)
    return since(start)


def time_sweep(name, runs, steps, evals, folder, vectorized):
    """(wall, cpu) seconds to train every run with one shared compiled step (loop, or one
    vmap group)."""
    start = clocks()
    engine = sweep.Engine(config_for(name, optim.spec(name).centre_lr, steps, evals))
    mode = "vmap" if vectorized else "loop"
    groups = [runs] if vectorized else [[run] for run in runs]
    for i, group in enumerate(groups):
        engine.train_group(group, os.path.join(folder, name, mode, str(i)), vectorized)
    return since(start)


def main(argv):
    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
    for flag, minimum in ((_STEPS, 1), (_LR_POINTS, 1), (_SEEDS, 1), (_EVALS, 1)):
        if flag.value < minimum:
            cli.fail(f"--{flag.name} must be >= {minimum}, got {flag.value}")
    logging.set_verbosity(logging.WARNING)
    steps, evals = _STEPS.value, _EVALS.value
    runs = grid("adamw", _LR_POINTS.value, _SEEDS.value)
    work = len(runs) * steps
    print(f"{len(runs)} runs x {steps} steps (AdamW, tiny LM, {evals} evals each) on "
          f"{jax.device_count()} x {jax.devices()[0].device_kind}", flush=True)
    with tempfile.TemporaryDirectory() as folder:
        seconds = {"train per point (before)": time_solo_runs("adamw", runs, steps, evals,
                                                              folder)}
        for mode in ("loop", "vmap"):
            seconds[f"sweep {mode}"] = time_sweep("adamw", runs, steps, evals, folder,
                                                  mode == "vmap")
        before = seconds["train per point (before)"]
        print(f"{'way':<26} {'wall s':>8} {'runs*steps/s':>13} {'vs before':>10} "
              f"{'cpu s':>8} {'runs*steps/cpu s':>17} {'vs before':>10}")
        for way, (wall, cpu) in seconds.items():
            print(f"{way:<26} {wall:8.1f} {work / wall:13.1f} {before[0] / wall:9.2f}x "
                  f"{cpu:8.1f} {work / cpu:17.1f} {before[1] / cpu:9.2f}x", flush=True)
        print(f"default mode on this backend: {race.default_sweep_mode()}")
        if _SHAMPOO.value:
            runs = grid("shampoo", _LR_POINTS.value, _SEEDS.value)
            shampoo = {mode: time_sweep("shampoo", runs, steps, evals, folder, mode == "vmap")
                       for mode in ("loop", "vmap")}
            for clock, i in (("wall", 0), ("cpu", 1)):
                adamw_ratio = seconds["sweep vmap"][i] / seconds["sweep loop"][i]
                shampoo_ratio = shampoo["vmap"][i] / shampoo["loop"][i]
                print(f"{clock}: shampoo sweep loop {shampoo['loop'][i]:.1f} s, vmap "
                      f"{shampoo['vmap'][i]:.1f} s; vmap / loop: adamw {adamw_ratio:.2f}, "
                      f"shampoo {shampoo_ratio:.2f}; shampoo / adamw "
                      f"{shampoo_ratio / adamw_ratio:.2f} (<= 1.5: refreshes stay amortized)")


if __name__ == "__main__":
    cli.run(main)
