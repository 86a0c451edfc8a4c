"""Helpers shared by the demos: PRNG keys, list flags, saving figures, log-log slopes."""
import datetime
import json
import math
import os
import platform
import sys

import matplotlib

matplotlib.use("Agg")  # Demos run headless (CI, ssh).
import matplotlib.pyplot as plt  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

DEFAULT_OUTDIR = "runs/demos"


def prng_key(seed):
    """A PRNG key on XLA's RBG generator: on CPU its programs compile several times faster
    than the default threefry's (model inits and samplers here: ~2 s instead of ~8 s)."""
    return jax.random.key(seed, impl="rbg")


def define_output_flags(flag_values=flags.FLAGS):
    """--outdir and --dpi, where and how finely `save_figure` writes the demo's PNG."""
    flags.DEFINE_string("outdir", DEFAULT_OUTDIR, "Folder for the PNG.", flag_values=flag_values)
    flags.DEFINE_integer("dpi", 100, "Resolution of the PNG (docs/demos/ copies use 80).",
                         lower_bound=10, flag_values=flag_values)


def define_number_list(name, default, help_text, parse=float, check=lambda x: x > 0,
                       requirement="positive numbers"):
    """A comma-separated list flag whose entries must `parse` and pass `check`.

    A bad entry fails flag parsing, which `experiments.cli.run` turns into exit status 2
    with one line naming the flag. Read the values with `numbers(FLAGS.<name>, parse)`.
    """
    flags.DEFINE_list(name, default, help_text)

    def valid(values):
        try:
            parsed = [parse(v) for v in values]
        except ValueError:
            return False
        return bool(parsed) and all(math.isfinite(x) and check(x) for x in parsed)

    flags.register_validator(name, valid, message=f"--{name} must be a comma-separated list "
                                                  f"of {requirement}")


def numbers(values, parse=float):
    """The parsed entries of a list flag defined with `define_number_list`."""
    return [parse(v) for v in values]


def save_figure(fig, outdir, name, dpi=100):
    """Saves `fig` as `outdir/name.png`, closes it and returns the path."""
    os.makedirs(outdir, exist_ok=True)
    path = os.path.join(outdir, f"{name}.png")
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return path


def first_index_at_or_below(values, target):
    """Along the last axis, the first index with value <= target, or inf where there is none."""
    hit = np.asarray(values) <= target
    return np.where(hit.any(axis=-1), hit.argmax(axis=-1), np.inf)


def loglog_slope(x, y):
    """Least-squares slope of log(y) against log(x): the exponent p in y ~ x^p."""
    slope, _ = np.polyfit(np.log(np.asarray(x, float)), np.log(np.asarray(y, float)), 1)
    return float(slope)


def write_results(name, numbers, outdir):
    """`outdir/<name>.json`: a demo's numbers (what its printout and README quote) with the
    machine, date and command that made them; returns the path."""
    record = {"processor": platform.processor() or platform.machine(),
              "device": jax.devices()[0].device_kind, "cpus": os.cpu_count(),
              "date": datetime.date.today().isoformat(),
              "command": " ".join([f"python -m ravine.experiments.demos.{name}",
                                   *sys.argv[1:]]),
              **numbers}
    os.makedirs(outdir, exist_ok=True)
    path = os.path.join(outdir, f"{name}.json")
    with open(path, "w") as f:
        json.dump(record, f, indent=1)
    return path
