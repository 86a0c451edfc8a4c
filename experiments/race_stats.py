"""The statistics of a race: intervals over seeds, paired tests, steps to a target, grids.

Pure functions of plain numbers, used by `experiments.race`:

    mean, half, n = mean_ci([1.98, 2.01, 1.97])        # mean ± half: 95% Student-t interval
    p = paired_p_value(losses_a, losses_b)             # two-sided paired t-test
    step = steps_to_target([(0, 5.5), (10, 2.4), (20, 1.9)], 2.0)   # 18.0, interpolated
    reached, n, median = censored([18.0, None, 40.0])  # 2 of 3 reached, median 29.0
    grid, added = settle_grid([1e-3, 2e-3, 4e-3], mean_loss_at, spacing=2, max_points=9)

Student-t quantiles and tail probabilities come from scipy (a dependency of jax).
"""
import math
import statistics

from scipy import stats as _scipy_stats


def finite(values):
    """The finite numbers among `values` (None and NaN / inf dropped)."""
    return [v for v in values if v is not None and math.isfinite(v)]


def t_quantile(probability, dof):
    """The `probability` quantile of Student's t with `dof` degrees of freedom."""
    return float(_scipy_stats.t.ppf(probability, dof))


def mean_ci(values, confidence=0.95):
    """(mean, half width of the two-sided `confidence` Student-t interval, n) of the finite
    `values`: `half = t_{(1 + confidence) / 2, n - 1} * s / sqrt(n)` with `s` the sample
    standard deviation. The half width is NaN for n < 2 and the mean NaN for n = 0."""
    values = finite(values)
    n = len(values)
    if n == 0:
        return math.nan, math.nan, 0
    mean = statistics.fmean(values)
    if n < 2:
        return mean, math.nan, 1
    half = t_quantile((1 + confidence) / 2, n - 1) * statistics.stdev(values) / math.sqrt(n)
    return mean, half, n


def paired_p_value(a, b):
    """Two-sided p-value of the paired t-test of `mean(a - b) = 0`; pairs where either is
    not finite are dropped. NaN with fewer than 2 pairs; with identical differences, 0 (or 1
    when they are all 0)."""
    diffs = [x - y for x, y in zip(a, b)
             if x is not None and y is not None and math.isfinite(x) and math.isfinite(y)]
    n = len(diffs)
    if n < 2:
        return math.nan
    mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
    if sd == 0:
        return 1.0 if mean == 0 else 0.0
    t = mean / (sd / math.sqrt(n))
    return float(2 * _scipy_stats.t.sf(abs(t), n - 1))


def steps_to_target(curve, target):
    """The first step at which the eval curve reaches `target`, linearly interpolated between
    the two evals around the crossing; None if it never does.

    Args:
      curve: [(step, eval_loss)] in step order (the first may be step 0, before training).
      target: the loss to reach.
    """
    previous = None
    for step, loss in curve:
        if loss is None or not math.isfinite(loss):
            return None
        if loss <= target:
            if previous is None or previous[1] == loss:
                return float(step)
            (step0, loss0) = previous
            return step0 + (loss0 - target) / (loss0 - loss) * (step - step0)
        previous = (step, loss)
    return None


def censored(values):
    """(k, n, median): how many of the n runs reached the target (value not None) and the
    median of their values (NaN when none did)."""
    reached = [v for v in values if v is not None]
    return len(reached), len(values), (statistics.median(reached) if reached else math.nan)


def next_lr(grid, losses, spacing, max_points):
    """The learning rate to add to `grid`, or None when it is settled.

    The best lr (lowest finite loss) at the grid's lowest edge extends it down by `spacing`,
    at its highest edge up; a grid with no finite loss (every lr diverged) extends down
    only, as divergence never asks for larger learning rates. Nothing is added once the grid
    holds `max_points`.

    Args:
      grid: the learning rates tried, ascending.
      losses: {lr: loss} for every lr of `grid` (NaN / inf for diverged).
      spacing: ratio of neighbouring lrs.
      max_points: the most points the grid may hold.
    """
    if len(grid) >= max_points:
        return None
    tried = [lr for lr in grid if math.isfinite(losses[lr])]
    if not tried:
        return grid[0] / spacing
    best = min(tried, key=lambda lr: losses[lr])
    if len(grid) > 1 and best == grid[0]:
        return grid[0] / spacing
    if len(grid) > 1 and best == grid[-1]:
        return grid[-1] * spacing
    return None


def settle_grid(grid, losses_at, spacing, max_points):
    """Extends `grid` past an edge while the best lr sits there (see `next_lr`).

    Args:
      grid: the initial learning rates.
      losses_at: `losses_at(lrs) -> {lr: loss}` for a list of lrs (it trains what is
        missing; it is called with the whole grid each time).
      spacing, max_points: as `next_lr`.

    Returns:
      (grid ascending, losses {lr: loss}, the lrs added in order).
    """
    grid = sorted(grid)
    added = []
    while True:
        losses = losses_at(grid)
        lr = next_lr(grid, losses, spacing, max_points)
        if lr is None:
            return grid, losses, added
        added.append(lr)
        grid = sorted(grid + [lr])
