"""Benchmark scores: AlgoPerf performance profiles, data speedups, ranking stability.

Pure numpy / scipy functions on small tables of results; the benchmark job
(`ravine-bench`) feeds them and plots what they return.

- `algoperf_score`, `performance_profile`, `bootstrap_score`: the AlgoPerf benchmark's
  time-to-target scores (Dahl et al. 2023, https://arxiv.org/abs/2306.07179; Kasimbeg et
  al. 2025, https://arxiv.org/abs/2502.15015), built on Dolan & Moré's performance profiles
  (2002, https://arxiv.org/abs/cs/0102001).
- `fit_loss_curve`, `data_speedup`: how much more data a baseline needs to reach an
  optimizer's loss (Wen et al. 2025, "Fantastic Pretraining Optimizers and Where to Find
  Them", https://arxiv.org/abs/2509.02046).
- `ranking_stability`: Kendall's tau between the ranking at each evaluation and the final
  one (rankings can flip during training, Wen et al. 2025; Semenov et al. 2025,
  https://arxiv.org/abs/2509.01440).
- `expected_best`, `bootstrap_expected_best`: the expected best result of k trials against
  k, the tuning budget's curve (Dodge et al. 2019, "Show Your Work",
  https://arxiv.org/abs/1909.03004).

    times = {"adamw": {"lm": 100.0, "digits": 50.0}, "muon": {"lm": 80.0, "digits": inf}}
    scoring.algoperf_score(times)   # {"adamw": 0.9583, "muon": 0.5}
"""
from collections.abc import Mapping, Sequence
import math
import numbers
from typing import NamedTuple

import numpy as np
import scipy.optimize
import scipy.stats


def _is_real(value) -> bool:
    """A real number (Python or numpy scalar), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)

# --- AlgoPerf scores ------------------------------------------------------------------------

def _times_table(times) -> tuple[list[str], list[str], np.ndarray]:
    """Validates `times[optimizer][workload]`; returns (optimizers, workloads, [n_opt, n_wl])."""
    if not isinstance(times, Mapping) or not times:
        raise ValueError(f"times must be a non-empty mapping optimizer -> {{workload: time}}, "
                         f"got {times!r}")
    optimizers = list(times)
    first = times[optimizers[0]]
    if not isinstance(first, Mapping) or not first:
        raise ValueError(f"times[{optimizers[0]!r}] must be a non-empty mapping workload -> "
                         f"time, got {first!r}")
    workloads = list(first)
    table = np.empty((len(optimizers), len(workloads)))
    for i, name in enumerate(optimizers):
        row = times[name]
        if not isinstance(row, Mapping) or set(row) != set(workloads):
            got = sorted(row) if isinstance(row, Mapping) else row
            raise ValueError(f"times[{name!r}] must have the workloads {sorted(workloads)}, "
                             f"got {got!r}")
        for j, workload in enumerate(workloads):
            value = row[workload]
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"times[{name!r}][{workload!r}] must be a number, "
                                 f"got {value!r}") from None
            if math.isnan(value) or value <= 0:
                raise ValueError(f"times[{name!r}][{workload!r}] must be > 0 (inf for a "
                                 f"missed target), got {value!r}")
            table[i, j] = value
    return optimizers, workloads, table


def _check_r_max(r_max):
    if not _is_real(r_max) or not math.isfinite(r_max) or r_max <= 1:
        raise ValueError(f"r_max must be a finite number > 1, got {r_max!r}")


def _ratios(table: np.ndarray) -> np.ndarray:
    """Performance ratios r = t / min over optimizers, per workload (axis -2 = optimizers).

    A miss is inf; a workload that every optimizer missed gives inf for all of them.
    """
    best = table.min(axis=-2, keepdims=True)
    with np.errstate(invalid="ignore"):
        ratios = table / best
    return np.where(np.isfinite(best), ratios, np.inf)  # inf / inf -> inf, not nan


def _scores(table: np.ndarray, r_max: float) -> np.ndarray:
    """`algoperf_score` on arrays [..., n_optimizers, n_workloads] -> [..., n_optimizers]."""
    ratios = _ratios(table)
    contributions = np.where(ratios <= r_max, (r_max - ratios) / (r_max - 1.0), 0.0)
    return contributions.mean(axis=-1)


def algoperf_score(times: Mapping[str, Mapping[str, float]],
                   r_max: float = 4.0) -> dict[str, float]:
    """The AlgoPerf benchmark score of each optimizer.

    Per workload w, each optimizer's performance ratio is `r = t / min_o t_o` (its time over
    the best optimizer's time on w; 1 for the best, ties share it). The performance profile
    `rho(tau)` is the fraction of workloads with `r <= tau` and the score is

        B = 1 / (r_max - 1) * integral_1^r_max rho(tau) d tau,

    computed exactly for the step function rho: a workload with ratio `r <= r_max`
    contributes `(r_max - r) / (r_max - 1) / n_workloads`, one with `r > r_max` or a miss
    nothing. B is 1 for an optimizer that is the fastest everywhere and 0 for one that is
    never within `r_max` of the best.

    Misses: a missed target is `float("inf")` and never counts. A workload that every
    optimizer missed counts for no one: it stays in `n_workloads` and adds 0 to every
    score (as in AlgoPerf, where an unsolved workload is lost for everybody; dropping it
    instead would raise every score).

    Args:
      times: `times[optimizer][workload]`, time to target in seconds or steps (any unit, the
        same within a workload), `float("inf")` for a miss; every optimizer must have the
        same workloads.
      r_max: the largest ratio that still earns credit (AlgoPerf: 4).

    Returns:
      `{optimizer: score}` with scores in [0, 1].

    Raises:
      ValueError: `times` is empty, ragged, non-positive or NaN; `r_max <= 1`.

    References:
      Dahl et al. 2023, "Benchmarking Neural Network Training Algorithms",
      https://arxiv.org/abs/2306.07179 (Section 4.5); Dolan & Moré 2002,
      https://arxiv.org/abs/cs/0102001.
    """
    _check_r_max(r_max)
    optimizers, _, table = _times_table(times)
    return {name: float(score) for name, score in zip(optimizers, _scores(table, r_max))}


def performance_profile(times: Mapping[str, Mapping[str, float]],
                        taus) -> dict[str, np.ndarray]:
    """rho(tau): the fraction of workloads an optimizer solves within tau times the best.

    `rho_o(tau) = #{w : t_{o,w} / min_o' t_{o',w} <= tau} / n_workloads`; misses (inf)
    never count, also at `tau = inf`, and a workload every optimizer missed counts for no
    one (see `algoperf_score`). The comparison is exact (no tolerance).

    Args:
      times: `times[optimizer][workload]` as for `algoperf_score`.
      taus: 1-D array of ratios at which to evaluate rho (any order; NaN is rejected).

    Returns:
      `{optimizer: float array of rho at each tau}`, non-decreasing in tau.

    Raises:
      ValueError: bad `times` or `taus`.

    References:
      Dolan & Moré 2002, https://arxiv.org/abs/cs/0102001; Dahl et al. 2023,
      https://arxiv.org/abs/2306.07179.
    """
    optimizers, _, table = _times_table(times)
    taus = np.asarray(taus, dtype=float)
    if taus.ndim != 1 or taus.size == 0 or np.isnan(taus).any():
        raise ValueError(f"taus must be a non-empty 1-D array of numbers, got {taus!r}")
    ratios = _ratios(table)  # [n_opt, n_wl]
    within = np.isfinite(ratios)[:, :, None] & (ratios[:, :, None] <= taus[None, None, :])
    profile = within.mean(axis=1)
    return {name: profile[i] for i, name in enumerate(optimizers)}


class ScoreInterval(NamedTuple):
    """A score with a bootstrap confidence interval: `low <= score <= high` usually."""
    score: float
    low: float
    high: float


def bootstrap_score(study_times: Mapping[str, Mapping[str, Sequence[float]]],
                    r_max: float = 4.0, num_resamples: int = 2000,
                    confidence: float = 0.95, seed: int = 0) -> dict[str, ScoreInterval]:
    """AlgoPerf scores with percentile-bootstrap intervals over studies.

    `study_times[optimizer][workload]` holds one time per study (AlgoPerf's external
    tuning: a study's time is its fastest trial's; inf when no trial hit the target).
    A workload's time is the median over studies, and `score` is `algoperf_score` of those
    medians. Each bootstrap resample draws, per optimizer, as many studies as it has with
    replacement, and uses the same drawn study indices for all of that optimizer's
    workloads (a study is one tuning run of the whole suite, so it is resampled whole);
    different optimizers are resampled independently. The interval is the
    `(1 - confidence) / 2` and `(1 + confidence) / 2` quantiles of the resampled scores.
    Seeds nested in studies can be flattened into the study axis.

    With an even number of studies the median of {t, inf} is inf (a tie between a hit and a
    miss counts as a miss).

    Args:
      study_times: `study_times[optimizer][workload]` = sequence of per-study times (> 0,
        inf for a miss); the same number of studies for every workload of an optimizer.
      r_max: as for `algoperf_score`.
      num_resamples: bootstrap resamples (>= 1).
      confidence: the interval's coverage, in (0, 1).
      seed: seed of the resampling.

    Returns:
      `{optimizer: ScoreInterval(score, low, high)}`.

    Raises:
      ValueError: ragged or invalid times, or a bad `r_max`, `num_resamples`, `confidence`.

    References:
      Dahl et al. 2023, https://arxiv.org/abs/2306.07179 (external tuning, Section 4.4);
      Efron & Tibshirani 1993, "An Introduction to the Bootstrap" (percentile interval).
    """
    _check_r_max(r_max)
    if not isinstance(num_resamples, int) or isinstance(num_resamples, bool) \
            or num_resamples < 1:
        raise ValueError(f"num_resamples must be a positive integer, got {num_resamples!r}")
    if not _is_real(confidence) or not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    if not isinstance(study_times, Mapping) or not study_times:
        raise ValueError(f"study_times must be a non-empty mapping optimizer -> "
                         f"{{workload: [time per study]}}, got {study_times!r}")
    per_study = {}
    for name, row in study_times.items():
        if not isinstance(row, Mapping) or not row:
            raise ValueError(f"study_times[{name!r}] must be a non-empty mapping, got {row!r}")
        counts = {w: np.size(v) for w, v in row.items()}
        if len(set(counts.values())) != 1 or min(counts.values()) < 1:
            raise ValueError(f"study_times[{name!r}] must have the same number (>= 1) of "
                             f"studies for every workload, got {counts}")
        per_study[name] = {}
        for w, v in row.items():
            try:
                per_study[name][w] = np.asarray(v, dtype=float).reshape(-1)
            except (TypeError, ValueError):
                raise ValueError(f"study_times[{name!r}][{w!r}] must be a sequence of "
                                 f"numbers, got {v!r}") from None
    medians = {name: {w: float(np.median(v)) for w, v in row.items()}
               for name, row in per_study.items()}
    optimizers, workloads, _ = _times_table(medians)  # validates names, values, raggedness
    for name in optimizers:
        for w in workloads:
            values = per_study[name][w]
            if np.isnan(values).any() or (values <= 0).any():
                raise ValueError(f"study_times[{name!r}][{w!r}] must be > 0 (inf for a "
                                 f"miss), got {values.tolist()}")
    point = algoperf_score(medians, r_max)

    rng = np.random.default_rng(seed)
    resampled = np.empty((num_resamples, len(optimizers), len(workloads)))
    for i, name in enumerate(optimizers):
        studies = np.stack([per_study[name][w] for w in workloads])  # [n_wl, S]
        draws = rng.integers(studies.shape[1], size=(num_resamples, studies.shape[1]))
        resampled[:, i, :] = np.median(studies[:, draws], axis=-1).T  # [R, n_wl]
    scores = _scores(resampled, r_max)  # [R, n_opt]
    low, high = np.quantile(scores, [(1 - confidence) / 2, (1 + confidence) / 2], axis=0)
    return {name: ScoreInterval(point[name], float(low[i]), float(high[i]))
            for i, name in enumerate(optimizers)}


# --- data speedup ---------------------------------------------------------------------------

class LossCurveFit(NamedTuple):
    """`L(D) = E + B * D^-beta` fitted to a loss-against-tokens curve.

    `relative_residual` is the fit's root-mean-square residual over the range
    `max(losses) - min(losses)` of the fitted losses (0 for an exact fit).
    """
    E: float
    B: float
    beta: float
    relative_residual: float

    def __call__(self, tokens):
        return self.E + self.B * np.asarray(tokens, dtype=float) ** -self.beta

    def tokens_for(self, loss: float) -> float:
        """The D with L(D) = loss; inf when `loss <= E` (never reached)."""
        if loss <= self.E:
            return math.inf
        return float((self.B / (loss - self.E)) ** (1.0 / self.beta))


_BETA_RANGE = (1e-3, 5.0)


def _check_curve(base_tokens, base_losses):
    tokens = np.asarray(base_tokens, dtype=float)
    losses = np.asarray(base_losses, dtype=float)
    if tokens.ndim != 1 or tokens.size < 2 or not np.isfinite(tokens).all() \
            or (tokens <= 0).any() or np.unique(tokens).size != tokens.size:
        raise ValueError(f"base_tokens must be >= 2 distinct finite positive numbers, got "
                         f"{np.asarray(base_tokens).tolist()}")
    if losses.shape != tokens.shape or not np.isfinite(losses).all():
        raise ValueError(f"base_losses must be {tokens.size} finite numbers (one per token "
                         f"count), got {np.asarray(base_losses).tolist()}")
    order = np.argsort(tokens)
    return tokens[order], losses[order]


def fit_loss_curve(tokens, losses) -> LossCurveFit:
    """Fits the saturating power law `L = E + B * D^-beta` (B >= 0) to losses at D tokens.

    For a fixed beta the model is linear in (E, B), so the fit profiles beta: (E, B) by
    least squares at each beta on a log grid over [1e-3, 5], then a bounded scalar
    minimisation of the residual around the best grid point (variable projection; no
    initial guess, no overflow: D is scaled by its geometric mean inside the fit). Where
    the unconstrained B would be negative (losses that rise with D), B = 0 and E is the
    mean loss.

    Args:
      tokens: 1-D token counts (>= 3 distinct positive values: three parameters).
      losses: the loss reached with each token count.

    Returns:
      `LossCurveFit(E, B, beta, relative_residual)`, callable as `fit(tokens)`.

    Raises:
      ValueError: fewer than 3 points, or bad values.

    References:
      Hoffmann et al. 2022 (Chinchilla), https://arxiv.org/abs/2203.15556, Eq. (2)'s data
      term; Golub & Pereyra 1973 (variable projection).
    """
    tokens, losses = _check_curve(tokens, losses)
    if tokens.size < 3:
        raise ValueError(f"fit_loss_curve needs >= 3 points (E, B, beta), got "
                         f"{tokens.size}: tokens={tokens.tolist()}")
    scale = math.exp(np.log(tokens).mean())
    x = tokens / scale

    def solve(beta):
        design = np.stack([np.ones_like(x), x ** -beta], axis=1)
        (e, b), *_ = np.linalg.lstsq(design, losses, rcond=None)
        if b < 0:
            e, b = losses.mean(), 0.0
        residual = e + b * x ** -beta - losses
        return float(residual @ residual), e, b

    grid = np.geomspace(*_BETA_RANGE, 200)
    errors = [solve(beta)[0] for beta in grid]
    k = int(np.argmin(errors))
    lo, hi = grid[max(k - 1, 0)], grid[min(k + 1, grid.size - 1)]
    best = scipy.optimize.minimize_scalar(lambda beta: solve(beta)[0], bounds=(lo, hi),
                                          method="bounded", options={"xatol": 1e-10})
    beta = float(best.x) if best.fun <= errors[k] else float(grid[k])
    error, e, b = solve(beta)
    spread = losses.max() - losses.min()
    rms = math.sqrt(error / losses.size)
    relative = rms / spread if spread > 0 else (0.0 if rms == 0 else math.inf)
    return LossCurveFit(E=float(e), B=float(b * scale ** beta), beta=beta,
                        relative_residual=float(relative))


def _interpolated_tokens(tokens, losses, loss):
    """The first D at which the piecewise-linear log L(log D) curve reaches `loss`."""
    log_d, log_l, target = np.log(tokens), np.log(losses), math.log(loss)

    def along(segment):
        slope = (log_l[segment + 1] - log_l[segment]) / (log_d[segment + 1] - log_d[segment])
        return float(math.exp(log_d[segment] + (target - log_l[segment]) / slope))

    if target >= log_l[0]:
        # Reached by the smallest run already: back along the first segment if it falls,
        # else the smallest run's tokens (nothing is known below it).
        return along(0) if log_l[1] < log_l[0] else float(tokens[0])
    reached = np.nonzero(log_l <= target)[0]
    if reached.size:
        return along(int(reached[0]) - 1)  # that segment falls through the target
    if log_l[-1] < log_l[-2]:
        return along(tokens.size - 2)  # below every run: extend the last segment
    return math.inf


def data_speedup(base_tokens, base_losses, tokens: float, loss: float, *,
                 method: str = "auto", max_residual: float = 0.05) -> float:
    """How many times more data the baseline needs to reach `loss`: `D_needed / tokens`.

    Wen et al. 2025's speedup: the baseline (AdamW) is trained at several token counts
    (e.g. 1x, 2x, 4x Chinchilla) giving its loss-against-tokens curve; an optimizer that
    reaches `loss` with `tokens` has speedup `D_needed / tokens`, D_needed being the tokens
    the baseline needs for that loss on its curve.

    The curve:
    - "power_law": `fit_loss_curve` (L = E + B D^-beta), inverted:
      `D_needed = (B / (loss - E))^(1 / beta)`.
    - "interpolate": log L linear in log D between neighbouring points (sorted by D);
      D_needed is the first crossing of `loss`. Outside the measured losses the end
      segment is extended (a power law with that segment's slope): below every run along
      the last segment (inf if it does not fall), at or above the smallest run's loss back
      along the first segment (the smallest run's D if that segment does not fall).
    - "auto" (default): "power_law" unless the fit is poor, then "interpolate". Poor means
      fewer than 3 points, B = 0 (the losses do not fall with D), or a
      `relative_residual` (RMS residual / range of the baseline's losses) above
      `max_residual`.

    Extrapolation: both curves extrapolate. A `loss` below the baseline's best is
    reached at D beyond its largest run (the power law's D_needed; inf when
    `loss <= E`, the baseline's fitted floor, or when the last segment is flat or
    rising); a `loss` above its worst gives D below the smallest run (speedup < 1).
    Far extrapolations are only as good as the curve: check `fit_loss_curve`.

    Args:
      base_tokens: the baseline's token counts (>= 2 distinct, > 0).
      base_losses: its loss at each.
      tokens: the tokens the compared optimizer used (> 0).
      loss: the loss it reached (> 0 for "interpolate", which works on log L).
      method: "auto", "power_law" or "interpolate".
      max_residual: the "auto" threshold on the fit's relative residual.

    Returns:
      `D_needed / tokens` (> 1: the optimizer needs less data than the baseline); inf when
      the baseline's curve never reaches `loss`.

    Raises:
      ValueError: bad curve, `tokens`, `loss`, `method` or `max_residual`; "power_law" with
        fewer than 3 points.

    References:
      Wen et al. 2025, https://arxiv.org/abs/2509.02046 (Section 3, speedup);
      Hoffmann et al. 2022, https://arxiv.org/abs/2203.15556.
    """
    base_tokens, base_losses = _check_curve(base_tokens, base_losses)
    if not _is_real(tokens) or not math.isfinite(tokens) \
            or tokens <= 0:
        raise ValueError(f"tokens must be a finite number > 0, got {tokens!r}")
    if not _is_real(loss) or not math.isfinite(loss):
        raise ValueError(f"loss must be a finite number, got {loss!r}")
    if method not in ("auto", "power_law", "interpolate"):
        raise ValueError(f"method must be one of ['auto', 'power_law', 'interpolate'], "
                         f"got {method!r}")
    if not _is_real(max_residual) or not max_residual >= 0:
        raise ValueError(f"max_residual must be a number >= 0, got {max_residual!r}")
    fit = None
    if method == "power_law" or (method == "auto" and base_tokens.size >= 3):
        fit = fit_loss_curve(base_tokens, base_losses)
        if method == "auto" and not (fit.B > 0 and fit.relative_residual <= max_residual):
            fit = None
    if fit is not None:
        needed = fit.tokens_for(loss)
    else:
        if loss <= 0 or (base_losses <= 0).any():
            raise ValueError(f"log-log interpolation needs positive losses, got loss={loss!r}, "
                             f"base_losses={base_losses.tolist()}")
        needed = _interpolated_tokens(base_tokens, base_losses, loss)
    return needed / float(tokens)


# --- ranking stability ----------------------------------------------------------------------

class RankingStability(NamedTuple):
    """Kendall's tau of each evaluation's ranking against the final ranking.

    `steps[i]` and `taus[i]` per evaluation (NaN where a ranking has every value tied);
    `stable_from`: the first step from which tau stays >= the threshold at every later
    evaluation, None if the last evaluation is below it.
    """
    steps: np.ndarray
    taus: np.ndarray
    stable_from: int | None


def ranking_stability(rankings_over_time: Mapping[int, Mapping[str, float]],
                      final: Mapping[str, float], threshold: float = 0.8) -> RankingStability:
    """When does the ranking of optimizers settle? Kendall's tau against the final ranking.

    At each evaluation, the optimizers' metric (e.g. eval loss) orders them; Kendall's
    tau-b (`scipy.stats.kendalltau`, ties handled) compares that order with `final`'s.
    With 5 optimizers tau = 0.8 means exactly one discordant (swapped) pair. The metric's
    direction does not matter as long as it is the same everywhere. A NaN tau (every value
    tied at an evaluation, e.g. at initialisation) counts as below the threshold; tau is
    compared with the threshold up to 1e-12 (rounding).

    Args:
      rankings_over_time: `{step: {optimizer: metric}}`, every evaluation with the same
        optimizers as `final` (>= 2).
      final: `{optimizer: metric}` of the final evaluation.
      threshold: the tau at which the ranking counts as settled.

    Returns:
      `RankingStability(steps, taus, stable_from)`, steps in increasing order.

    Raises:
      ValueError: missing optimizers, fewer than 2, non-finite metrics, no evaluations.

    References:
      Kendall 1938, "A New Measure of Rank Correlation"; Wen et al. 2025,
      https://arxiv.org/abs/2509.02046 (rankings flip during training).
    """
    if not isinstance(final, Mapping) or len(final) < 2:
        raise ValueError(f"final must map >= 2 optimizers to a metric, got {final!r}")
    if not isinstance(rankings_over_time, Mapping) or not rankings_over_time:
        raise ValueError(f"rankings_over_time must be a non-empty mapping step -> "
                         f"{{optimizer: metric}}, got {rankings_over_time!r}")
    if not _is_real(threshold) or not -1 <= threshold <= 1:
        raise ValueError(f"threshold must be in [-1, 1], got {threshold!r}")
    names = list(final)
    reference = np.array([float(final[n]) for n in names])
    if not np.isfinite(reference).all():
        raise ValueError(f"final must hold finite metrics, got {dict(final)!r}")
    steps = sorted(rankings_over_time)
    taus = []
    for step in steps:
        row = rankings_over_time[step]
        if not isinstance(row, Mapping) or set(row) != set(names):
            raise ValueError(f"rankings_over_time[{step!r}] must rank the optimizers "
                             f"{sorted(names)}, got {row!r}")
        values = np.array([float(row[n]) for n in names])
        if not np.isfinite(values).all():
            raise ValueError(f"rankings_over_time[{step!r}] must hold finite metrics, "
                             f"got {dict(row)!r}")
        if np.ptp(values) == 0 or np.ptp(reference) == 0:
            taus.append(math.nan)
        else:
            taus.append(float(scipy.stats.kendalltau(values, reference).statistic))
    taus = np.array(taus)
    # 1e-12: scipy's tau for one swapped pair of 5 is 0.7999999999999999.
    settled = np.nan_to_num(taus, nan=-np.inf) >= threshold - 1e-12
    stable_from = None
    if settled[-1]:
        unsettled = np.nonzero(~settled)[0]
        stable_from = steps[unsettled[-1] + 1] if unsettled.size else steps[0]
    return RankingStability(np.array(steps), taus, stable_from)


# ------------------------------------------------------------------ tuning budget curves

def _check_trial_values(values):
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.size == 0 or not np.isfinite(values).all():
        raise ValueError(f"values must be a non-empty 1-D sequence of finite trial results, "
                         f"got {values!r}")
    return values


def _check_ks(ks):
    ks = np.asarray(ks)
    if ks.ndim != 1 or ks.size == 0 or not np.issubdtype(ks.dtype, np.integer) or \
            (ks < 1).any():
        raise ValueError(f"ks must be a non-empty 1-D sequence of ints >= 1, got {ks!r}")
    return ks


def expected_best(values: Sequence[float], ks: Sequence[int]) -> np.ndarray:
    """The expected best (lowest) result of k trials drawn from `values`, for each k in `ks`.

    Dodge et al.'s expected validation performance: k trials drawn with replacement from
    the empirical distribution of the trials run; exactly, with v_1 <= ... <= v_n sorted,
    E[min of k] = sum_i v_i ((n - i + 1)^k - (n - i)^k) / n^k. At k = 1 it is the mean, as
    k grows it falls to the best trial run.

    Args:
      values: the trials' results (lower is better; finite: count a failed trial as the
        worst result you accept).
      ks: trial counts (ints >= 1).

    Returns:
      array of `len(ks)` expected bests.

    Raises:
      ValueError: empty or non-finite values, ks below 1 or not ints.

    References:
      Dodge et al. 2019, "Show Your Work: Improved Reporting of Experimental Results",
      https://arxiv.org/abs/1909.03004.

    >>> expected_best([1.0, 3.0], [1, 2])   # k = 2: min 1 unless both draws are 3
    array([2. , 1.5])
    """
    values = np.sort(_check_trial_values(values))
    ks = _check_ks(ks)
    n = values.size
    at_least = np.arange(n, 0, -1, dtype=np.float64) / n   # P(draw >= v_i), i = 1..n
    above = np.append(at_least[1:], 0.0)                    # P(draw > v_i)
    weights = at_least[None, :] ** ks[:, None] - above[None, :] ** ks[:, None]
    return weights @ values


def bootstrap_expected_best(values: Sequence[float], ks: Sequence[int],
                            num_resamples: int = 1000, confidence: float = 0.95,
                            seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A percentile-bootstrap interval of `expected_best(values, ks)` over the trials.

    Each resample draws `len(values)` trials with replacement and recomputes the curve.

    Args:
      values, ks: as for `expected_best`.
      num_resamples: bootstrap resamples (>= 1).
      confidence: the interval's coverage, in (0, 1).
      seed: seed of the resampling.

    Returns:
      `(low, high)`, arrays of `len(ks)`.

    Raises:
      ValueError: as `expected_best`, or a bad `num_resamples` / `confidence`.
    """
    values = _check_trial_values(values)
    ks = _check_ks(ks)
    if not isinstance(num_resamples, numbers.Integral) or num_resamples < 1:
        raise ValueError(f"num_resamples must be an int >= 1, got {num_resamples!r}")
    if not _is_real(confidence) or not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, values.size, size=(num_resamples, values.size))
    curves = np.stack([expected_best(values[row], ks) for row in draws])
    low, high = np.quantile(curves, [(1 - confidence) / 2, (1 + confidence) / 2], axis=0)
    return low, high
