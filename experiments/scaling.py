"""Scaling-law fits: power laws, IsoFLOP optima, the parametric loss surface, critical batch.

Pure numpy / scipy functions on lists of run records; the `ravine-scaling` job runs the
training and feeds them.

- `fit_power_law`: y = coefficient * x^exponent, least squares in log-log.
- `fit_isoflop`, `bootstrap_isoflop`: Chinchilla's approach 2 (IsoFLOP profiles) — per
  compute budget the loss-optimal model size, then N_opt ~ C^a and D_opt ~ C^b
  (Hoffmann et al. 2022, https://arxiv.org/abs/2203.15556, Section 3.2).
- `fit_loss_surface`: Chinchilla's approach 3 — L(N, D) = E + A / N^alpha + B / D^beta
  fitted with a Huber loss on log L (Section 3.3 and Appendix D.2).
- `fit_critical_batch`: S(B) = S_min (1 + B_crit / B) (McCandlish et al. 2018,
  https://arxiv.org/abs/1812.06162); `critical_batch_zhang`: the batch size at which steps
  exceed perfect scaling by 20% (Zhang et al. 2024, https://arxiv.org/abs/2410.21676).

Records are mappings with keys "params" (N), "tokens" (D), "loss" and, for IsoFLOP
profiles, "flops" (the budget C the run belongs to); extra keys (e.g. "seed") are ignored
except where a function says otherwise.

    result = scaling.fit_isoflop(records)     # result.a, result.b, result.optima
    surface = scaling.fit_loss_surface(records)  # surface.E, .A, .B, .alpha, .beta, .a, .b
"""
from collections.abc import Iterable, Mapping
import dataclasses
import itertools
import math

import numpy as np
import scipy.optimize
import scipy.special

from ravine.experiments.scoring import _is_real  # one check of "a real number, not a bool"


def _positive_array(name, values, min_size=1):
    array = np.asarray(values, dtype=float)
    if array.ndim != 1 or array.size < min_size or not np.isfinite(array).all() \
            or (array <= 0).any():
        raise ValueError(f"{name} must be >= {min_size} finite numbers > 0, got "
                         f"{np.asarray(values).tolist()}")
    return array


def fit_power_law(x, y) -> tuple[float, float]:
    """Fits `y = coefficient * x^exponent` by least squares on `log y = log c + e log x`.

    Args:
      x: 1-D positive values (>= 2 distinct).
      y: 1-D positive values, one per x.

    Returns:
      `(coefficient, exponent)`; exact for data on a power law.

    Raises:
      ValueError: non-positive or non-finite values, mismatched lengths, < 2 distinct x.

    References:
      Kaplan et al. 2020, https://arxiv.org/abs/2001.08361; Hoffmann et al. 2022,
      https://arxiv.org/abs/2203.15556 (the N_opt(C), D_opt(C) fits).
    """
    x = _positive_array("x", x, 2)
    y = _positive_array("y", y, 1)
    if y.shape != x.shape:
        raise ValueError(f"y must have one value per x ({x.size}), got {y.size}")
    if np.unique(x).size < 2:
        raise ValueError(f"x must hold >= 2 distinct values, got {x.tolist()}")
    exponent, intercept = np.polyfit(np.log(x), np.log(y), 1)
    return float(math.exp(intercept)), float(exponent)


# --- records --------------------------------------------------------------------------------

def _records_table(records, keys) -> dict[str, np.ndarray]:
    """Columns of `records` for `keys`, validated (finite; > 0 except "loss" may be any)."""
    if isinstance(records, Mapping) or not isinstance(records, Iterable):
        raise ValueError(f"records must be an iterable of mappings, got {records!r}")
    records = list(records)
    if not records:
        raise ValueError("records must not be empty")
    columns = {key: [] for key in keys}
    for i, record in enumerate(records):
        if not isinstance(record, Mapping):
            raise ValueError(f"records[{i}] must be a mapping, got {record!r}")
        for key in keys:
            if key not in record:
                raise ValueError(f"records[{i}] has no {key!r} (needs {list(keys)}): "
                                 f"{dict(record)!r}")
            try:
                value = float(record[key])
            except (TypeError, ValueError):
                raise ValueError(f"records[{i}][{key!r}] must be a number, got "
                                 f"{record[key]!r}") from None
            if not math.isfinite(value) or (key != "loss" and value <= 0):
                raise ValueError(f"records[{i}][{key!r}] must be finite"
                                 f"{'' if key == 'loss' else ' and > 0'}, got {value!r}")
            columns[key].append(value)
    return {key: np.asarray(values) for key, values in columns.items()}


# --- IsoFLOP profiles (Chinchilla approach 2) -----------------------------------------------

@dataclasses.dataclass(frozen=True)
class IsoflopFit:
    """Result of `fit_isoflop`.

    Attributes:
      a: exponent of N_opt ~ C^a.
      b: exponent of D_opt ~ C^b.
      n_coefficient: G in N_opt = G * C^a.
      d_coefficient: G' in D_opt = G' * C^b.
      optima: `(flops, n_opt, d_opt)` per budget, in increasing flops.
      parabolas: `{flops: (c2, c1, c0)}`, loss = c2 log(N)^2 + c1 log(N) + c0 per budget.
      min_losses: `{flops: loss at n_opt}` on each parabola.
      extrapolated: budgets whose n_opt lies outside the sizes sampled for them (the
        parabola's minimum is an extrapolation: widen that budget's sizes).
    """
    a: float
    b: float
    n_coefficient: float
    d_coefficient: float
    optima: list[tuple[float, float, float]]
    parabolas: dict[float, tuple[float, float, float]]
    min_losses: dict[float, float]
    extrapolated: tuple[float, ...]


def _isoflop_optima(flops, params, tokens, loss):
    """Per budget: (flops, n_opt, d_opt, parabola, min_loss, extrapolated)."""
    optima = []
    for budget in np.unique(flops):
        on = flops == budget
        log_n, log_d = np.log(params[on]), np.log(tokens[on])
        if np.unique(log_n).size < 3:
            raise ValueError(f"records at flops={budget:g} need >= 3 distinct params for a "
                             f"parabola, got {np.unique(params[on]).tolist()}")
        c2, c1, c0 = np.polyfit(log_n, loss[on], 2)
        if not c2 > 0:
            raise ValueError(f"records at flops={budget:g}: loss against log(params) is not "
                             f"convex (parabola coefficient {c2:.3g}), so it has no minimum; "
                             f"params={params[on].tolist()}, loss={loss[on].tolist()}")
        log_n_opt = -c1 / (2 * c2)
        # The budget's own tokens-for-params relation (D = C / flops_per_token(N)), a line
        # in log-log (exact when flops per token are proportional to N, C = 6 N D).
        slope, intercept = np.polyfit(log_n, log_d, 1)
        log_d_opt = intercept + slope * log_n_opt
        min_loss = c0 - c1 * c1 / (4 * c2)
        outside = not log_n.min() <= log_n_opt <= log_n.max()
        optima.append((float(budget), math.exp(log_n_opt), math.exp(log_d_opt),
                       (float(c2), float(c1), float(c0)), float(min_loss), outside))
    return optima


def fit_isoflop(records: Iterable[Mapping[str, float]]) -> IsoflopFit:
    """Chinchilla's approach 2: IsoFLOP profiles give N_opt(C) ~ C^a and D_opt(C) ~ C^b.

    Records with the same "flops" value (the nominal budget C, not each run's rounded
    actual FLOPs) form one IsoFLOP profile. Per profile a parabola of loss in log N
    (least squares) gives `N_opt = exp(-c1 / (2 c2))`. D_opt is read off the profile's own
    tokens-for-params relation: log D regressed linearly on log N over that budget's
    records, evaluated at N_opt (exact for C = 6 N D, and it honours whatever FLOPs per
    token the records used, attention included) — not a separate parabola in log D.
    Then `fit_power_law` over budgets gives (G, a) and (G', b).

    Args:
      records: mappings with "flops", "params", "tokens", "loss"; >= 2 budgets, each
        with >= 3 distinct params.

    Returns:
      `IsoflopFit` with `.a`, `.b`, `.optima` (`(flops, n_opt, d_opt)` per budget) and the
      per-budget parabolas.

    Raises:
      ValueError: missing keys, bad values, < 2 budgets, < 3 sizes in a budget, or a
        profile that is not convex.

    References:
      Hoffmann et al. 2022, "Training Compute-Optimal Large Language Models",
      https://arxiv.org/abs/2203.15556 (Section 3.2, Figure 3).
    """
    table = _records_table(records, ("flops", "params", "tokens", "loss"))
    if np.unique(table["flops"]).size < 2:
        raise ValueError(f"records must span >= 2 flops budgets, got "
                         f"{np.unique(table['flops']).tolist()}")
    optima = _isoflop_optima(table["flops"], table["params"], table["tokens"], table["loss"])
    budgets = [o[0] for o in optima]
    n_coefficient, a = fit_power_law(budgets, [o[1] for o in optima])
    d_coefficient, b = fit_power_law(budgets, [o[2] for o in optima])
    return IsoflopFit(
        a=a, b=b, n_coefficient=n_coefficient, d_coefficient=d_coefficient,
        optima=[(c, n, d) for c, n, d, *_ in optima],
        parabolas={o[0]: o[3] for o in optima},
        min_losses={o[0]: o[4] for o in optima},
        extrapolated=tuple(o[0] for o in optima if o[5]))


@dataclasses.dataclass(frozen=True)
class IsoflopInterval:
    """Result of `bootstrap_isoflop`: percentile intervals of the exponents a and b.

    Attributes:
      a: `(low, high)` of N_opt's exponent.
      b: `(low, high)` of D_opt's exponent.
      a_samples, b_samples: the exponents of the valid resamples.
      dropped: resamples discarded because a profile had < 3 distinct sizes or was not
        convex.
    """
    a: tuple[float, float]
    b: tuple[float, float]
    a_samples: np.ndarray
    b_samples: np.ndarray
    dropped: int


def bootstrap_isoflop(records: Iterable[Mapping[str, float]], num_resamples: int = 1000,
                      confidence: float = 0.95, seed: int = 0,
                      group_by: str | None = None) -> IsoflopInterval:
    """Percentile-bootstrap intervals for `fit_isoflop`'s exponents a and b.

    Two resampling units:
    - `group_by=None`: records are resampled with replacement within each budget (each
      profile keeps its number of records): the interval reflects the scatter of the
      points around each parabola.
    - `group_by="seed"` (or any record key): the distinct values of that key are
      resampled with replacement and every record of a drawn value enters (twice if it is
      drawn twice): the interval over seeds, each seed being a full set of runs.
    Resamples in which a profile has < 3 distinct sizes or is not convex are dropped and
    counted.

    Args:
      records: as for `fit_isoflop` (plus the `group_by` key if given).
      num_resamples: bootstrap resamples (>= 1).
      confidence: the intervals' coverage, in (0, 1).
      seed: seed of the resampling.
      group_by: None or the record key whose values are the resampling unit.

    Returns:
      `IsoflopInterval(a=(low, high), b=(low, high), a_samples, b_samples, dropped)`.

    Raises:
      ValueError: bad records or arguments, a missing `group_by` key, or no valid resample.

    References:
      Hoffmann et al. 2022, https://arxiv.org/abs/2203.15556 (Table 2's intervals);
      Efron & Tibshirani 1993, "An Introduction to the Bootstrap".
    """
    if not isinstance(num_resamples, int) or isinstance(num_resamples, bool) \
            or num_resamples < 1:
        raise ValueError(f"num_resamples must be a positive integer, got {num_resamples!r}")
    if not _is_real(confidence) or not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    records = list(records) if isinstance(records, Iterable) \
        and not isinstance(records, Mapping) else records
    fit_isoflop(records)  # validates; the full data must fit
    table = _records_table(records, ("flops", "params", "tokens", "loss"))
    rng = np.random.default_rng(seed)
    if group_by is None:
        groups = [np.nonzero(table["flops"] == c)[0] for c in np.unique(table["flops"])]
    else:
        missing = [i for i, r in enumerate(records) if group_by not in r]
        if missing:
            raise ValueError(f"group_by={group_by!r}: records {missing[:5]} lack that key")
        keys = [records[i][group_by] for i in range(len(records))]
        units = list(dict.fromkeys(keys))
        members = [np.array([i for i, k in enumerate(keys) if k == u]) for u in units]
    a_samples, b_samples, dropped = [], [], 0
    for _ in range(num_resamples):
        if group_by is None:
            index = np.concatenate([rng.choice(g, size=g.size) for g in groups])
        else:
            index = np.concatenate([members[j] for j in rng.integers(len(units),
                                                                     size=len(units))])
        try:
            optima = _isoflop_optima(*(table[k][index] for k in
                                       ("flops", "params", "tokens", "loss")))
        except ValueError:
            dropped += 1
            continue
        if len(optima) < 2:
            dropped += 1
            continue
        budgets = [o[0] for o in optima]
        a_samples.append(fit_power_law(budgets, [o[1] for o in optima])[1])
        b_samples.append(fit_power_law(budgets, [o[2] for o in optima])[1])
    if not a_samples:
        raise ValueError(f"no valid bootstrap resample out of {num_resamples} (every one had "
                         f"a profile with < 3 sizes or no minimum)")
    q = [(1 - confidence) / 2, (1 + confidence) / 2]
    a_low, a_high = np.quantile(a_samples, q)
    b_low, b_high = np.quantile(b_samples, q)
    return IsoflopInterval(a=(float(a_low), float(a_high)), b=(float(b_low), float(b_high)),
                           a_samples=np.array(a_samples), b_samples=np.array(b_samples),
                           dropped=dropped)


# --- parametric loss surface (Chinchilla approach 3) ----------------------------------------

@dataclasses.dataclass(frozen=True)
class LossSurfaceFit:
    """`L(N, D) = E + A / N^alpha + B / D^beta`, the result of `fit_loss_surface`.

    `a = beta / (alpha + beta)` and `b = alpha / (alpha + beta)` are the exponents of the
    compute-optimal N_opt ~ C^a and D_opt ~ C^b that the surface implies under C = 6 N D.
    `objective` is the minimised mean Huber loss / delta.
    """
    E: float
    A: float
    B: float
    alpha: float
    beta: float
    objective: float

    @property
    def a(self) -> float:
        return self.beta / (self.alpha + self.beta)

    @property
    def b(self) -> float:
        return self.alpha / (self.alpha + self.beta)

    def __call__(self, params, tokens):
        """The fitted loss at N = params, D = tokens (arrays broadcast)."""
        params, tokens = np.asarray(params, float), np.asarray(tokens, float)
        return self.E + self.A / params ** self.alpha + self.B / tokens ** self.beta


# Chinchilla's Appendix D.2 grid of initialisations.
CHINCHILLA_INIT_GRID = {
    "alpha": (0.0, 0.5, 1.0, 1.5, 2.0),
    "beta": (0.0, 0.5, 1.0, 1.5, 2.0),
    "e": (-1.0, -0.5, 0.0, 0.5, 1.0),
    "a": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "b": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
}


def _surface_objective(theta, log_n, log_d, log_loss, delta):
    """Mean Huber_delta(LSE(a - alpha log N, b - beta log D, e) - log L) / delta, and its
    gradient in theta = (a, b, e, alpha, beta); theta may be batched [k, 5]."""
    a, b, e, alpha, beta = np.moveaxis(np.asarray(theta, float), -1, 0)
    terms = np.stack(np.broadcast_arrays(
        a[..., None] - alpha[..., None] * log_n, b[..., None] - beta[..., None] * log_d,
        e[..., None] + 0 * log_n), axis=-1)  # [..., n, 3]
    prediction = scipy.special.logsumexp(terms, axis=-1)
    residual = prediction - log_loss
    value = scipy.special.huber(delta, residual).mean(axis=-1) / delta
    weights = np.exp(terms - prediction[..., None])  # softmax: d prediction / d terms
    psi = np.clip(residual, -delta, delta) / delta / residual.shape[-1]
    grad = np.stack([(psi * weights[..., 0]).sum(-1), (psi * weights[..., 1]).sum(-1),
                     (psi * weights[..., 2]).sum(-1),
                     -(psi * weights[..., 0] * log_n).sum(-1),
                     -(psi * weights[..., 1] * log_d).sum(-1)], axis=-1)
    return value, grad


def fit_loss_surface(records: Iterable[Mapping[str, float]], delta: float = 1e-3,
                     init_grid: Mapping[str, Iterable[float]] | None = None,
                     num_starts: int | None = 16) -> LossSurfaceFit:
    """Chinchilla's approach 3: fits `L(N, D) = E + A / N^alpha + B / D^beta`.

    As Hoffmann et al. (Appendix D.2): with A = exp(a), B = exp(b), E = exp(e),

        min over (a, b, e, alpha, beta) of
            sum_i Huber_delta(LSE(a - alpha log N_i, b - beta log D_i, e) - log L_i),

    delta = 1e-3, by L-BFGS (`scipy.optimize.minimize`, analytic gradient) from a grid of
    initialisations, keeping the best. The Huber loss makes the fit robust to outliers.
    The objective is divided by delta and by the number of records (same minimiser, better
    scaled for L-BFGS's tolerances). For speed the whole grid is evaluated first and
    L-BFGS runs from the `num_starts` best grid points (`num_starts=None`: from every
    point, exactly as the paper).

    Args:
      records: mappings with "params" (N), "tokens" (D), "loss" (> 0); >= 5 records.
      delta: the Huber threshold on log L.
      init_grid: `{"a", "b", "e", "alpha", "beta": values}`; default
        `CHINCHILLA_INIT_GRID` (the paper's 4500 points).
      num_starts: L-BFGS runs, from the best grid points; None for all.

    Returns:
      `LossSurfaceFit(E, A, B, alpha, beta, objective)`, with `.a` = beta/(alpha+beta) and
      `.b` = alpha/(alpha+beta).

    Raises:
      ValueError: bad records (a non-positive loss), < 5 records, bad `delta`,
        `init_grid` or `num_starts`.

    References:
      Hoffmann et al. 2022, https://arxiv.org/abs/2203.15556 (Section 3.3, Appendix D.2);
      Besiroglu et al. 2024, "Chinchilla Scaling: A replication attempt",
      https://arxiv.org/abs/2404.10102.
    """
    table = _records_table(records, ("params", "tokens", "loss"))
    if (table["loss"] <= 0).any():
        raise ValueError(f"records' 'loss' must be > 0 (the fit is on log L), got "
                         f"{table['loss'].tolist()}")
    if table["loss"].size < 5:
        raise ValueError(f"fit_loss_surface needs >= 5 records (5 parameters), got "
                         f"{table['loss'].size}")
    if not _is_real(delta) or not math.isfinite(delta) or delta <= 0:
        raise ValueError(f"delta must be a finite number > 0, got {delta!r}")
    if num_starts is not None and (not isinstance(num_starts, int)
                                   or isinstance(num_starts, bool) or num_starts < 1):
        raise ValueError(f"num_starts must be a positive integer or None, got {num_starts!r}")
    grid = dict(CHINCHILLA_INIT_GRID if init_grid is None else init_grid)
    names = ("a", "b", "e", "alpha", "beta")
    if set(grid) != set(names) or not all(len(tuple(grid[k])) for k in names):
        raise ValueError(f"init_grid must give values for each of {list(names)}, got "
                         f"{init_grid!r}")
    log_n, log_d, log_loss = np.log(table["params"]), np.log(table["tokens"]), \
        np.log(table["loss"])
    starts = np.array(list(itertools.product(*(tuple(grid[k]) for k in names))), float)
    values = np.concatenate([_surface_objective(chunk, log_n, log_d, log_loss, delta)[0]
                             for chunk in np.array_split(starts, max(1, starts.size // 5000))])
    if num_starts is not None:
        starts = starts[np.argsort(values, kind="stable")[:num_starts]]

    def objective(theta):
        value, grad = _surface_objective(theta, log_n, log_d, log_loss, delta)
        return float(value), grad

    best = None
    for start in starts:
        result = scipy.optimize.minimize(objective, start, jac=True, method="L-BFGS-B",
                                         options={"maxiter": 2000, "ftol": 1e-15,
                                                  "gtol": 1e-10})
        if best is None or result.fun < best.fun:
            best = result
    a, b, e, alpha, beta = best.x
    return LossSurfaceFit(E=float(math.exp(e)), A=float(math.exp(a)), B=float(math.exp(b)),
                          alpha=float(alpha), beta=float(beta), objective=float(best.fun))


# --- critical batch size --------------------------------------------------------------------

def _batch_steps(batch_sizes, steps):
    batch_sizes = _positive_array("batch_sizes", batch_sizes, 2)
    steps = _positive_array("steps", steps, 1)
    if steps.shape != batch_sizes.shape:
        raise ValueError(f"steps must have one value per batch size ({batch_sizes.size}), "
                         f"got {steps.size}")
    if np.unique(batch_sizes).size != batch_sizes.size:
        raise ValueError(f"batch_sizes must be distinct, got {batch_sizes.tolist()}")
    order = np.argsort(batch_sizes)
    return batch_sizes[order], steps[order]


def fit_critical_batch(batch_sizes, steps) -> tuple[float, float]:
    """Fits McCandlish et al.'s `S(B) = S_min (1 + B_crit / B)` to steps-to-target.

    S = S_min + (S_min B_crit) / B is linear in 1/B: with c0 = S_min and c1 = S_min B_crit,
    (c0, c1) minimise the relative squared error sum_i ((c0 + c1 / B_i - S_i) / S_i)^2
    (steps span orders of magnitude across batch sizes) subject to c0, c1 >= 0
    (`scipy.optimize.nnls`). Exact on data from the model. B_crit = c1 / c0 = E_min / S_min
    (the batch at which training takes 2 S_min steps and 2 E_min examples); B_crit = inf
    (S_min = 0) when the data show perfect scaling (S ∝ 1/B) throughout, 0 when steps do
    not fall with B at all.

    Args:
      batch_sizes: >= 2 distinct batch sizes (> 0).
      steps: steps to reach the target loss at each (> 0).

    Returns:
      `(s_min, b_crit)`.

    Raises:
      ValueError: bad, mismatched or repeated values.

    References:
      McCandlish et al. 2018, "An Empirical Model of Large-Batch Training",
      https://arxiv.org/abs/1812.06162 (Eq. 2.11).
    """
    batch_sizes, steps = _batch_steps(batch_sizes, steps)
    design = np.stack([np.ones_like(batch_sizes), 1.0 / batch_sizes], axis=1) / steps[:, None]
    (c0, c1), _ = scipy.optimize.nnls(design, np.ones_like(steps))
    if c0 <= 0:
        return 0.0, math.inf
    return float(c0), float(c1 / c0)


def critical_batch_zhang(batch_sizes, steps, overshoot: float = 0.2) -> float:
    """Zhang et al.'s critical batch size: where steps exceed perfect scaling by 20%.

    The perfect-scaling line runs through the smallest batch size's measurement:
    `S_lin(B) = S(B_0) B_0 / B` (doubling the batch halves the steps). With the overhead
    ratio `R(B) = S(B) / S_lin(B) = S(B) B / (S(B_0) B_0)`, the critical batch size B* is
    the first B with `R(B) = 1 + overshoot`, log R interpolated linearly in log B between
    the two measured batch sizes around the first crossing (the measurements themselves,
    not a fitted curve). On McCandlish's curve S_min (1 + B_crit / B),
    R(B) = (B + B_crit) / (B_0 + B_crit), so B* = (1 + o) B_0 + o B_crit.

    Args:
      batch_sizes: >= 2 distinct batch sizes (> 0), any order.
      steps: steps to reach the target loss at each (> 0).
      overshoot: the overhead over perfect scaling that defines B* (Zhang et al.: 0.2).

    Returns:
      B*; inf when R stays below `1 + overshoot` over the measured batch sizes.

    Raises:
      ValueError: bad inputs or `overshoot <= 0`.

    References:
      Zhang et al. 2024, "How Does Critical Batch Size Scale in Pre-training?",
      https://arxiv.org/abs/2410.21676 (Section 2, Figure 1).
    """
    if not _is_real(overshoot) or not math.isfinite(overshoot) \
            or overshoot <= 0:
        raise ValueError(f"overshoot must be a finite number > 0, got {overshoot!r}")
    batch_sizes, steps = _batch_steps(batch_sizes, steps)
    log_b = np.log(batch_sizes)
    log_r = np.log(steps * batch_sizes) - math.log(steps[0] * batch_sizes[0])
    target = math.log1p(overshoot)
    over = np.nonzero(log_r >= target)[0]
    if not over.size:
        return math.inf
    i = int(over[0])  # i >= 1: R(B_0) = 1 < 1 + overshoot
    fraction = (target - log_r[i - 1]) / (log_r[i] - log_r[i - 1])
    return float(math.exp(log_b[i - 1] + fraction * (log_b[i] - log_b[i - 1])))
