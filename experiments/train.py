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
A second signal (e.g. during the first compilation) stops at once without saving: one
line, exit `config.preempt_exit_code` for SIGTERM, 130 for SIGINT; later ones are ignored.

This file only parses flags and calls the runtime (`ravine.experiments.runtime`): in Python,
`summary = loop.train(lm.get_config("tiny"), workdir)`; `setup.setup(config)` and
`runtime.builders` are public for sweeps that drive steps themselves. The console script
`ravine-train` is the same as `python -m ravine.experiments.train`.
"""
import contextlib
import os

import jax
import tqdm
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
    stop = preemption.StopSignal(exit_now=_exit_now(workdir, config.preempt_exit_code))
    try:
        with stop.installed():
            with cli.usage_errors():
                s = setup(config)
            summary = loop.train(config, workdir, prepared=s, stop=stop,
                                 raise_on_divergence=True)
    except cli.UsageError as error:  # a bad workdir, another run in it, a changed config
        cli.fail(error)
    except KeyboardInterrupt:  # a Ctrl-C the handler did not see (a second one exits at once)
        cli.stopped(f"interrupted; re-running the same command resumes from "
                    f"{_latest(workdir)}", 130)
    except (loop.Diverged, OSError, checkpointing.RestoreError) as error:
        cli.stopped(f"error: {error}", EXIT_STOPPED)
    if summary["stopped_by"]:
        cli.stopped(f"stopped by {summary['stopped_by']} at step {summary['steps']} "
                    f"(checkpoint {summary['steps']} saved); re-running the same command "
                    "resumes from it", config.preempt_exit_code)


def _latest(workdir):
    """Where a rerun resumes, from a listing of the checkpoint folder (no Orbax: this runs in
    a signal handler too). Orbax names a checkpoint its step once it is complete."""
    with contextlib.suppress(OSError):
        steps = [int(name) for name in os.listdir(os.path.join(workdir, CHECKPOINT_DIR))
                 if name.isdigit()]
        if steps:
            return f"checkpoint {max(steps)}"
    return "the start (no checkpoint yet)"


def _exit_now(workdir, preempt_exit_code):
    """`StopSignal`'s `exit_now`: a second signal ends the process at once with one line on
    stderr and exit `preempt_exit_code` (SIGTERM) or 130 (SIGINT). `os._exit`, as a SIGKILL:
    no exception unwinds through a compilation in progress or Orbax's threads and no
    interpreter shutdown runs beside them (that crashed, exit 139); the lock goes with the
    process and a half-written checkpoint is ignored and removed by the next run."""
    valid = isinstance(preempt_exit_code, int) and 0 <= preempt_exit_code <= 255
    code = preempt_exit_code if valid else 143  # (an invalid one exits 2 at set-up)

    def exit_now(name):
        try:
            bar_open = any(not bar.disable for bar in list(tqdm.tqdm._instances))  # noqa: SLF001
        except Exception:  # noqa: BLE001 - only decides whether to end the bar's line
            bar_open = False
        line = (f"interrupted by a second {name}; re-running the same command resumes from "
                f"{_latest(workdir)}")
        # os.write, not print: the handler may run while the main thread writes to stderr
        os.write(2, (("\n" if bar_open else "") + line + "\n").encode())
        os._exit(code if name == "SIGTERM" else 130)

    return exit_now


def run_script():
    """`python -m ravine.experiments.train`: defines the flags and runs `main`."""
    holders = define_flags()
    cli.run(lambda argv: main(argv, holders))


if __name__ == "__main__":
    run_script()
