"""What a run writes about itself: metrics rows (metrics.jsonl), the loss plot, the summary.

    log = MetricsLog("runs/tiny/metrics.jsonl")
    log.write({"step": 1, "loss": 5.5, "lr": 3e-4})
    rows = log.rows()                        # complete rows only (a torn last line is skipped)
    plot_losses(rows, "runs/tiny/loss.png")

A writer is anything with `write(row)` and `close()`; `MetricsLog` is the one every run has
(only process 0 writes: construct the others with `enabled=False`).
"""
import json
import math
import os
import time

import jax
import numpy as np

METRICS_FILE, PLOT_FILE = "metrics.jsonl", "loss.png"


class MetricsLog:
    """DIR/metrics.jsonl, written by process 0: one JSON object per line, flushed each row."""

    def __init__(self, path, enabled=True):
        self.path, self.enabled = path, enabled

    def rows(self):
        """Every complete row (a line cut short by a kill is skipped)."""
        if not os.path.exists(self.path):
            return []
        rows = []
        with open(self.path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return rows

    def truncate(self, step):
        """Drops the rows after `step` (atomically), so the log matches a restored state."""
        if not self.enabled or not os.path.exists(self.path):
            return
        kept = [row for row in self.rows() if row["step"] <= step]
        write_atomically(self.path, "".join(json.dumps(row) + "\n" for row in kept))

    def write(self, row):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def close(self):
        """Nothing to release: every row is written and closed when it is written."""


def write_atomically(path, text):
    """Writes `text` to `path` through a temporary file and a rename, so a reader (or a kill)
    never sees half a file; the temporary file is removed when writing fails (disk full)."""
    tmp = path + ".tmp"
    try:
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, obj):
    """`obj` as indented JSON at `path`, atomically (see `write_atomically`)."""
    write_atomically(path, json.dumps(obj, indent=2, default=str))


class Throughput:
    """Tokens per second of training alone: the clock restarts after anything that is not
    a train step (compilation, evaluation, saving), via `restart`."""

    def __init__(self, tokens_per_step):
        self.tokens_per_step = tokens_per_step
        self.start = time.perf_counter()
        self._mark = None  # (time, step) of the last restart; None until the first step ran

    def restart(self, step):
        self._mark = (time.perf_counter(), step)

    def start_once(self, state):
        """Starts the clock after the first step (waiting for it: it compiled)."""
        if self._mark is None:
            jax.block_until_ready(state.step)
            self._mark = (time.perf_counter(), int(state.step))

    def rate(self, step):
        """Tokens/s since the last restart, or None when no step was timed."""
        if self._mark is None or step <= self._mark[1]:
            return None
        return (step - self._mark[1]) * self.tokens_per_step / (
            time.perf_counter() - self._mark[0])

    def elapsed(self):
        return time.perf_counter() - self.start


def train_row(step, metrics, state, rollbacks, clock, flops_per_token, peak_flops,
              hardware_flops_per_token=None):
    """The metrics.jsonl row of a logged step (`metrics`: the train step's, on the host;
    `clock`: the run's Throughput). "mfu" counts the model's FLOPs per token, "hfu" the
    hardware's (the model's plus remat's recomputation, `models.accounting.
    hardware_flops_per_token`; equal without remat)."""
    rate, mfu, hfu = clock.rate(step), None, None
    if rate and peak_flops:
        mfu = rate * flops_per_token / (peak_flops * jax.device_count())
        hfu = rate * (hardware_flops_per_token or flops_per_token) / (
            peak_flops * jax.device_count())
    return {"step": step, "loss": float(metrics["loss"]), "lr": float(metrics["lr"]),
            "grad_norm": float(metrics["grad_norm"]), "tokens_per_sec": rate, "mfu": mfu,
            "hfu": hfu,
            "loss_scale": float(metrics["loss_scale"]),
            "skipped_steps": int(state.skipped), "rollbacks": rollbacks,
            "wall_time": clock.elapsed(),
            # per-group norms (experiments/runtime/layer_norms.py), when the step computes them
            **{key: float(value) for key, value in metrics.get("layers", {}).items()}}


def summarize(rows, workdir, steps, n_params, rollbacks, seconds, diverged=False):
    """The summary `runtime.loop.train` returns (see its docstring); a diverged run's
    final eval losses are NaN (an earlier, finite eval must not rank it)."""
    def last(key):
        return next((row[key] for row in reversed(rows) if key in row), None)

    def final_eval(key):
        value = last(key)
        return math.nan if diverged and value is not None else value

    rates = [row["tokens_per_sec"] for row in rows if row.get("tokens_per_sec")]
    return {"workdir": workdir, "steps": steps, "params": n_params,
            "final_loss": last("loss"), "final_eval_loss": final_eval("eval_loss"),
            "final_eval_loss_ema": final_eval("eval_loss_ema"),
            "final_eval_loss_avg": final_eval("eval_loss_avg"),
            "tokens_per_sec": float(np.median(rates)) if rates else None,
            "skipped_steps": last("skipped_steps"), "rollbacks": rollbacks,
            "seconds": seconds, "history": rows, "diverged": diverged}


def plot_losses(rows, path):
    """Training and eval losses against step, saved as a PNG."""
    import matplotlib  # here, not at the top: a bad flag should fail without loading it
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for key, style in (("loss", "-"), ("eval_loss", "o-"), ("eval_loss_ema", "s--"),
                       ("eval_loss_avg", "^--")):
        points = [(row["step"], row[key]) for row in rows if row.get(key) is not None]
        if points:
            ax.plot(*zip(*points), style, label=key, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / byte)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
