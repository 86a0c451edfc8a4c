r"""Train a byte-level transformer LM from a config, resuming from DIR's latest checkpoint.

    python -m ravine.experiments.train --config=experiments/configs/lm.py:tiny --workdir=runs/tiny \
        --config.optimizer.name=lion --config.optimizer.learning_rate=3e-4

Writes DIR/metrics.jsonl (a row per logged step), DIR/config.json (the resolved config and
the corpus' size and hash), DIR/checkpoints/ (Orbax) and DIR/loss.png; a tqdm bar on stderr.
Bad flags or config values exit with status 2 and one line on stderr, before DIR is touched.
For emulated devices on CPU set `JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES=8`; on several hosts
set `--multihost` (calls `jax.distributed.initialize()`; each host reads its rows of a batch).

The workdir rules (experiments/runtime/workdir.py): one run per workdir (a second process exits 2
naming the first one's pid); a resume is the same run (trajectory fields changed since the
checkpoint exit 2, listing them); `--config.init_from=DIR[:STEP]` starts a new workdir
from another run's checkpoint (params; with `--config.init_from_optimizer=true` also the
optimizer state, step and data position). SIGTERM or Ctrl-C: the step finishes, a
checkpoint is saved, one line says where it stopped; exit `config.preempt_exit_code` (143).

This file only parses flags and calls the runtime (`ravine.experiments.runtime`): in Python,
`summary = loop.train(lm.get_config("tiny"), workdir)`; `setup.setup(config)` and
`runtime.builders` are public for sweeps that drive steps themselves. The console script
`ravine-train` is the same as `python -m ravine.experiments.train`.
"""
import contextlib
import os

import jax
from absl import flags, logging
from ml_collections import config_flags

from ravine.experiments.runtime import checkpointing, cli, loop, preemption, user_modules
from ravine.experiments.runtime.run_identity import CHECKPOINT_DIR
from ravine.experiments.runtime.setup import setup

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "lm.py")
EXIT_STOPPED = 1  # diverged, or a checkpoint could not be saved


def define_flags(default_config=DEFAULT_CONFIG):
    """Defines --config (a config file, `path[:variant]`), --workdir and --multihost; the
    scripts built on the train job (experiments.race) call it with their own default."""
    # --optimizer_module: a user's optim.register(...) runs before the config gets its fields
    user_modules.define_and_import()
    config = cli.define_config_flag(
        config_flags.DEFINE_config_file, "config", default_config,
        "Config file, `path[:variant]`.", lock_config=True)
    workdir = flags.DEFINE_string("workdir", None, "Run folder: checkpoints, metrics, plots.")
    multihost = flags.DEFINE_bool("multihost", False,
                                  "Call jax.distributed.initialize() first.")
    return config, workdir, multihost


def main(argv, flag_holders):
    """The script: `flag_holders` are `define_flags()`'s; bad input exits 2 with one line,
    a run that stops early (diverged, failed save, signal) exits nonzero with one line."""
    config_flag, workdir_flag, multihost_flag = flag_holders
    if len(argv) > 1:
        cli.fail(f"unexpected arguments: {' '.join(argv[1:])}")
    if multihost_flag.value:
        jax.distributed.initialize()
    if not flags.FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
    config = cli.flag_value(config_flag)
    workdir = workdir_flag.value
    if not workdir:
        cli.fail("--workdir is required")
    stop = preemption.StopSignal()
    try:
        with stop.installed():
            with cli.usage_errors():
                s = setup(config)
            summary = loop.train(config, workdir, prepared=s, stop=stop,
                                 raise_on_divergence=True)
    except cli.UsageError as error:  # a bad workdir, another run in it, a changed config
        cli.fail(error)
    except KeyboardInterrupt:  # a second Ctrl-C, or one before the run got going
        cli.stopped(f"interrupted; re-running the same command resumes from "
                    f"{_latest(workdir)}", 130)
    except (loop.Diverged, OSError, checkpointing.RestoreError) as error:
        cli.stopped(f"error: {error}", EXIT_STOPPED)
    if summary["stopped_by"]:
        cli.stopped(f"stopped by {summary['stopped_by']} at step {summary['steps']} "
                    f"(checkpoint {summary['steps']} saved); re-running the same command "
                    "resumes from it", config.preempt_exit_code)


def _latest(workdir):
    folder = os.path.join(workdir, CHECKPOINT_DIR)
    with contextlib.suppress(Exception):
        step = checkpointing.Checkpoints(folder, read_only=True).latest_step()
        if step is not None:
            return f"checkpoint {step}"
    return "the start (no checkpoint yet)"


def run_script():
    """`python -m ravine.experiments.train`: defines the flags and runs `main`."""
    holders = define_flags()
    cli.run(lambda argv: main(argv, holders))


if __name__ == "__main__":
    run_script()
