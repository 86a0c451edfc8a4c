"""Learning-rate decay on noisy least squares with a skewed spectrum: which final iterate wins.

Streaming linear regression in d dimensions: x ~ N(0, U D U^T) with U a random rotation and
D = diag(lambda_1..lambda_d), y = w*.x + sigma * noise, w* ~ N(0, I_d); SGD with batch 1 on
(w.x - y)^2 / 2 from w_0 = 0 for T steps. Excess risk (w - w*)^T U D U^T (w - w*), computed
exactly at the end, is compared to d sigma^2 / T, the asymptotic minimax rate (ordinary least
squares on T samples). The spectrum is a power law in a shifted index,

    lambda_i = 1 / (1 + (kappa - 1) (i - 1) / (d - 1)),   i = 1..d,

so lambda_1 = 1, lambda_d = 1/kappa and for kappa = d it is exactly i^-1; most eigenvalues are
small, the skewed case in which the schedule matters (--spectrum=power uses i^-p with
d^p = kappa instead). SGD is rotation-invariant, so U changes nothing in distribution; it is
there because the seed's problem has it.

Schedules, each a function of the step t in [0, T), with the peak lr eta tuned per kappa and T
over 2^(2 - k/2) / tr(Sigma), k = 0..24 (constant-lr SGD diverges above ~2 / tr(Sigma)):
  * constant eta, reporting the tail average of w_{T/2+1..T} (Jain et al. 2018);
  * inverse time eta / (1 + t/tau) and inverse square root eta / (1 + t/tau)^(1/2): the
    polynomial decays; tau is tuned too, through the final-to-peak ratio eta_T/eta in
    --end_ratios (a second knob the others do not get);
  * step decay (Ge, Kakade, Kidambi & Netrapalli 2019, arXiv 1904.12838, Algorithm 1):
    log2(T) phases of T/log2(T) steps, the lr halved at each (here starting at eta);
  * cosine to 0 (`optim.schedules.warmup_cosine(eta, T, end_value=0)`);
  * WSD (`optim.schedules.wsd(eta, T)`: flat, then linear to 0 over the last 20%);
  * eigencurve (Pan, Ye & Zhang 2022, arXiv 2110.14109): piecewise inverse time decay built
    from the spectrum. (Written without the paper's text at hand: the piecewise form is the
    one its Algorithm 1 describes; the stage lengths follow from the argument below and
    should be checked against the paper.) With mu = lambda_min, the eigenvalues are grouped in
    N = ceil(log2 kappa) octaves [2^(i-1) mu, 2^i mu), s_i of them in octave i; stage i
    lasts Delta_i = T sqrt(s_i) / sum_j sqrt(s_j) steps and within it

        eta_t = 1 / (1/eta + mu sum_{j<i} 2^(j-1) Delta_j + 2^(i-1) mu (t - t_{i-1})),

    i.e. 1/eta_t grows linearly with slope 2^(i-1) mu: the smallest eigenvalues get the
    classic 1/(mu t) decay first, each later stage decays as fast as the next octave
    allows. (The paper's 1/L is the tuned 1/eta here.) Delta_i ~ sqrt(s_i) minimizes
    sum_i s_i / Delta_i, the variance left in octave i after its stage, for a fixed T; for a
    power-law spectrum s_i shrinks geometrically in i and the bound (sum sqrt(s_i))^2 sigma^2/T
    is O(d sigma^2 / T), the minimax rate.

The seed's claims (its lecture on lr decay, after Ge et al. 2019 and Pan et al. 2022):
polynomial decay is "condition number worse" (~ kappa d sigma^2 / T), step decay is log(kappa)
worse, eigencurve is optimal and "looks like cosine". The demo tunes every schedule on
--tune_seeds random problems and reports its excess risk / (d sigma^2 / T) on --seeds fresh
ones (mean and 95% t-interval), and the log-log slope of that ratio against kappa.

Measured (docs/demos/lr_decay.json, d = 100, T = 1e5, kappa = 1000): the seed's ordering holds
(polynomial decays worst, step decay better, eigencurve the best final iterate, cosine second)
but not its rates on this spectrum: the polynomial decays grow like kappa^0.2-0.26, not kappa;
step decay is flat in kappa (2.8 -> 3.0), not log(kappa) worse; cosine stays ~15% behind
eigencurve; constant lr with tail averaging beats every final iterate. Between 10% and 90% of
training the tuned eigencurve's lr is within 0.65-2.1x of the tuned cosine's.

  python -m ravine.experiments.demos.lr_decay --kappas=10,100,1000 --horizons=10000,100000
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats
from absl import flags

from ravine.experiments.runtime import cli
from ravine.experiments.demos import _common
from ravine.optim import schedules

SCHEDULES = ("constant_tail_average", "inverse_time", "inverse_sqrt", "step", "cosine", "wsd",
             "eigencurve")
POLYNOMIAL = {"inverse_time": 1.0, "inverse_sqrt": 0.5}  # name -> exponent alpha
SPECTRA = ("harmonic", "power")
# Peak lrs tried, in units of 1/tr(Sigma) (batch-1 SGD on Gaussian data is stable below about
# 2/(tr(Sigma) + 2 lambda_max) at a constant lr; decaying schedules can start higher): 4 down
# to 2^-10, a factor sqrt(2) apart.
DEFAULT_LR_MULTIPLIERS = tuple(2.0 ** (2 - k / 2) for k in range(25))


def eigenvalues(kappa, dim, kind="harmonic"):
    """`dim` eigenvalues from 1 down to 1/kappa, descending (see the module docstring)."""
    index = np.arange(dim, dtype=np.float64)
    if kind == "harmonic":
        return 1.0 / (1.0 + (kappa - 1.0) * index / (dim - 1))
    if kind == "power":
        return (index + 1.0) ** (-math.log(kappa) / math.log(dim))
    raise ValueError(f"spectrum must be one of {list(SPECTRA)}, got {kind!r}")


def eigencurve_stages(lams, total_steps):
    """Eigencurve's stage lengths Delta_i (floats summing to T) and octave counts s_i."""
    mu = float(np.min(lams))
    octaves = max(1, math.ceil(math.log2(float(np.max(lams)) / mu) - 1e-9))
    which = np.clip(np.floor(np.log2(np.asarray(lams) / mu)).astype(int), 0, octaves - 1)
    counts = np.bincount(which, minlength=octaves).astype(np.float64)
    return total_steps * np.sqrt(counts) / np.sqrt(counts).sum(), counts


def eigencurve(peak_lr, lams, total_steps):
    """Eigencurve's learning rates for t = 0..T-1 (Pan et al. 2022, Algorithm 1)."""
    mu = float(np.min(lams))
    lengths, _ = eigencurve_stages(lams, total_steps)
    starts = np.concatenate([[0.0], np.cumsum(lengths)])
    slopes = 2.0 ** np.arange(lengths.size)
    t = np.arange(total_steps, dtype=np.float64)
    stage = np.clip(np.searchsorted(starts, t, side="right") - 1, 0, lengths.size - 1)
    done = np.concatenate([[0.0], np.cumsum(slopes * lengths)])[stage]
    return 1.0 / (1.0 / peak_lr + mu * (done + slopes[stage] * (t - starts[stage])))


def learning_rates(name, peak_lr, lams, total_steps, end_ratio=None):
    """The schedule `name` at peak `peak_lr` for t = 0..T-1, as a float64 array.

    `end_ratio` (polynomial decays only) is eta_T / eta, which fixes tau.
    """
    t = np.arange(total_steps, dtype=np.float64)
    if name == "constant_tail_average":
        return np.full(total_steps, peak_lr)
    if name in POLYNOMIAL:
        alpha = POLYNOMIAL[name]
        tau = total_steps / (end_ratio ** (-1.0 / alpha) - 1.0)
        return peak_lr / (1.0 + t / tau) ** alpha
    if name == "step":
        phases = max(1, int(math.log2(total_steps)))
        phase = np.minimum(t // (total_steps / phases), phases - 1)
        return peak_lr * 0.5**phase
    if name == "cosine":
        shape = schedules.warmup_cosine(1.0, total_steps, end_value=0.0)
        return peak_lr * np.asarray(shape(jnp.arange(total_steps)), np.float64)
    if name == "wsd":
        shape = schedules.wsd(1.0, total_steps)
        return peak_lr * np.asarray(shape(jnp.arange(total_steps)), np.float64)
    if name == "eigencurve":
        return eigencurve(peak_lr, lams, total_steps)
    raise ValueError(f"schedule must be one of {list(SCHEDULES)}, got {name!r}")


def candidates(lams, total_steps, lr_multipliers=DEFAULT_LR_MULTIPLIERS,
               end_ratios=(1e-1, 1e-2, 1e-3), names=SCHEDULES):
    """Every (schedule, peak lr, end ratio) to try and their lr table [configs, T] (float32);
    peak lr = multiplier / tr(Sigma)."""
    configs, rows = [], []
    for name in names:
        for multiplier in lr_multipliers:
            lr = float(multiplier / np.sum(lams))
            for ratio in (end_ratios if name in POLYNOMIAL else (None,)):
                configs.append((name, lr, ratio, multiplier))
                rows.append(learning_rates(name, lr, lams, total_steps, ratio))
    return configs, np.stack(rows).astype(np.float32)


def excess_risks(lams, table, sigma=1.0, seeds=3, seed=0):
    """Excess risk of every row of `table` (an lr schedule) on `seeds` random problems.

    Each seed draws its own rotation U, target w* ~ N(0, I) and sample stream; all rows of
    one seed see the same samples. Returns `(final, tail)`, each [seeds, configs]: the risk
    of the final iterate and of the average of the iterates after updates T/2+1..T
    (infinite where the run diverged).
    """
    keys = jax.random.split(_common.prng_key(seed), seeds)
    final, tail = _excess_risks(keys, jnp.asarray(lams, jnp.float32),
                                jnp.asarray(np.asarray(table, np.float32).T),
                                jnp.float32(sigma))
    final, tail = np.asarray(final, np.float64), np.asarray(tail, np.float64)
    return np.where(np.isfinite(final), final, np.inf), np.where(np.isfinite(tail), tail, np.inf)


@jax.jit
def _excess_risks(keys, lams, table, sigma):
    """`excess_risks` for PRNG `keys` [seeds] and the lr table [T, configs] (one compile per
    shape, shared by every kappa)."""
    dim, (total_steps, configs) = lams.size, table.shape
    half = total_steps // 2
    scale = jnp.sqrt(lams)

    def one_problem(key):
        rotation_key, target_key, data_key = jax.random.split(key, 3)
        rotation, _ = jnp.linalg.qr(jax.random.normal(rotation_key, (dim, dim)))
        w_star = jax.random.normal(target_key, (dim,))

        def step(carry, inputs):
            w, tail_sum = carry
            t, lr = inputs
            z = jax.random.normal(jax.random.fold_in(data_key, t), (dim + 1,))
            x = rotation @ (scale * z[:dim])
            residual = w @ x - (x @ w_star + sigma * z[dim])
            w = w - (lr * residual)[:, None] * x[None, :]
            tail_sum = tail_sum + jnp.where(t >= half, 1.0, 0.0) * w
            return (w, tail_sum), None

        w0 = jnp.zeros((configs, dim))
        (w, tail_sum), _ = jax.lax.scan(step, (w0, w0), (jnp.arange(total_steps), table))
        covariance = (rotation * scale**2) @ rotation.T

        def risk(estimate):
            error = estimate - w_star
            return jnp.einsum("ci,ij,cj->c", error, covariance, error)

        return risk(w), risk(tail_sum / (total_steps - half))

    return jax.vmap(one_problem)(keys)


def reported(name, final, tail):
    """The risk a schedule is judged by: the tail average for constant lr, else the final
    iterate."""
    return tail if name == "constant_tail_average" else final


def interval(samples, level=0.95):
    """Mean and the half-width of its Student-t confidence interval."""
    samples = np.asarray(samples, np.float64)
    if samples.size < 2 or not np.all(np.isfinite(samples)):
        return float(np.mean(samples)), float("nan")
    sem = samples.std(ddof=1) / math.sqrt(samples.size)
    return float(samples.mean()), float(scipy.stats.t.ppf(0.5 + level / 2, samples.size - 1) * sem)


def tune_and_evaluate(kappa, total_steps, dim=100, sigma=1.0, spectrum="harmonic",
                      lr_multipliers=DEFAULT_LR_MULTIPLIERS, end_ratios=(1e-1, 1e-2, 1e-3),
                      tune_seeds=4, seeds=16, seed=0, names=SCHEDULES):
    """Per schedule: the best (lr, end ratio) on `tune_seeds` problems (mean risk), then its
    risk / (d sigma^2 / T) on `seeds` fresh problems (mean, 95% half-width, samples; every
    schedule sees the same fresh problems and samples, so per-seed ratios pair up)."""
    lams = eigenvalues(kappa, dim, spectrum)
    configs, table = candidates(lams, total_steps, lr_multipliers, end_ratios, names)
    final, tail = excess_risks(lams, table, sigma, tune_seeds, seed)
    optimum = dim * sigma**2 / total_steps
    best = {}
    for j, (name, lr, ratio, multiplier) in enumerate(configs):
        score = float(np.mean(reported(name, final[:, j], tail[:, j]))) / optimum
        if name not in best or score < best[name]["tuning_ratio"]:
            best[name] = {"lr": lr, "lr_multiplier": multiplier, "end_ratio": ratio,
                          "tuning_ratio": score}
    rows = np.stack([learning_rates(name, best[name]["lr"], lams, total_steps,
                                    best[name]["end_ratio"]) for name in names])
    final, tail = excess_risks(lams, rows, sigma, seeds, seed + 10_000)
    for j, name in enumerate(names):
        ratios = reported(name, final[:, j], tail[:, j]) / optimum
        mean, half_width = interval(ratios)
        edge = best[name]["lr_multiplier"] in (max(lr_multipliers), min(lr_multipliers))
        best[name].update(ratio=mean, half_width=half_width, samples=ratios.tolist(),
                          lr_at_grid_edge=bool(edge and len(lr_multipliers) > 1))
    return best


def run(kappas=(10, 100, 1000), horizons=(10_000, 100_000), dim=100, sigma=1.0,
        spectrum="harmonic", lr_multipliers=DEFAULT_LR_MULTIPLIERS,
        end_ratios=(1e-1, 1e-2, 1e-3), tune_seeds=4, seeds=16, seed=0, names=SCHEDULES):
    """`results[T][kappa][schedule]` (see `tune_and_evaluate`) and `slopes[T][schedule]`, the
    log-log slope of the mean ratio against kappa."""
    results, slopes = {}, {}
    for total_steps in horizons:
        results[total_steps] = {kappa: tune_and_evaluate(
            kappa, total_steps, dim, sigma, spectrum, lr_multipliers, end_ratios, tune_seeds,
            seeds, seed, names) for kappa in kappas}
        slopes[total_steps] = {name: _common.loglog_slope(
            kappas, [results[total_steps][k][name]["ratio"] for k in kappas]) for name in names}
    return {"kappas": list(kappas), "horizons": list(horizons), "results": results,
            "slopes": slopes, "dim": dim, "sigma": sigma, "spectrum": spectrum}


def paired_ratio(at, numerator, denominator):
    """Geometric mean over the shared problems of risk(numerator) / risk(denominator), and
    its 95% interval (t-interval on the per-problem log ratios)."""
    logs = np.log(np.asarray(at[numerator]["samples"]) / np.asarray(at[denominator]["samples"]))
    mean, half_width = interval(logs)
    return {"ratio": math.exp(mean), "low": math.exp(mean - half_width),
            "high": math.exp(mean + half_width)}


def claims(result, total_steps=None, kappa=None):
    """The seed's ordering at the largest kappa and horizon, as booleans with the numbers."""
    total_steps = total_steps or max(result["horizons"])
    kappa = kappa or max(result["kappas"])
    at = result["results"][total_steps][kappa]
    ratio = {name: r["ratio"] for name, r in at.items()}
    decays = [n for n in ratio if n != "constant_tail_average"]  # final-iterate schedules
    polynomial = [n for n in POLYNOMIAL if n in ratio]
    best_two = sorted(decays, key=ratio.get)[:2]
    slopes = result["slopes"][total_steps]
    others = [n for n in slopes if n not in POLYNOMIAL]
    return {
        "total_steps": total_steps, "kappa": kappa,
        "polynomial_worst": min(ratio[n] for n in polynomial) > max(
            ratio[n] for n in ratio if n not in POLYNOMIAL),
        "step_beats_polynomial": ratio["step"] < min(ratio[n] for n in polynomial),
        "eigencurve_and_cosine_best_two": set(best_two) == {"eigencurve", "cosine"},
        "cosine_within_10pct_of_eigencurve": abs(ratio["cosine"] / ratio["eigencurve"] - 1) <= 0.1,
        "cosine_over_eigencurve": ratio["cosine"] / ratio["eigencurve"],
        "cosine_over_eigencurve_paired": paired_ratio(at, "cosine", "eigencurve"),
        "polynomial_slope_largest": min(slopes[n] for n in polynomial) > max(
            slopes[n] for n in others),
        "eigencurve_over_cosine_lr_middle": lr_ratio_range(result, kappa, total_steps),
    }


def lr_ratio_range(result, kappa, total_steps, numerator="eigencurve", denominator="cosine",
                   window=(0.1, 0.9)):
    """Smallest and largest ratio of two tuned schedules' learning rates over the middle of
    training (does eigencurve "look like cosine"?)."""
    lrs = tuned_schedules(result, kappa, total_steps)
    if numerator not in lrs or denominator not in lrs:
        return None
    middle = slice(int(window[0] * total_steps), int(window[1] * total_steps))
    ratio = lrs[numerator][middle] / lrs[denominator][middle]
    return [float(ratio.min()), float(ratio.max())]


def tuned_schedules(result, kappa, total_steps):
    """Each schedule's learning rates as tuned at (kappa, T), for the figure."""
    lams = eigenvalues(kappa, result["dim"], result["spectrum"])
    tuned = result["results"][total_steps][kappa]
    return {name: learning_rates(name, r["lr"], lams, total_steps, r["end_ratio"])
            for name, r in tuned.items()}


def plot(result, outdir, dpi=100):
    horizon = max(result["horizons"])
    kappas = result["kappas"]
    fig, (ax_shape, ax_kappa, ax_t) = _common.plt.subplots(1, 3, figsize=(17, 4.2))
    for name, lr in tuned_schedules(result, max(kappas), horizon).items():
        ax_shape.plot(np.arange(lr.size), lr, label=name)
    ax_shape.set(xlabel="step", ylabel="learning rate", yscale="log",
                 title=f"Tuned schedules (kappa={max(kappas):g}, T={horizon})")
    ax_shape.set_ylim(1e-5, 1.0)
    for name in result["slopes"][horizon]:
        rows = [result["results"][horizon][k][name] for k in kappas]
        (line,) = ax_kappa.plot(kappas, [r["ratio"] for r in rows], "o-",
                                label=f"{name} (slope {result['slopes'][horizon][name]:.2f})")
        ax_kappa.errorbar(kappas, [r["ratio"] for r in rows], [r["half_width"] for r in rows],
                          fmt="none", color=line.get_color(), capsize=3)
        horizons = result["horizons"]
        ax_t.plot(horizons, [result["results"][t][max(kappas)][name]["ratio"] for t in horizons],
                  "o-", color=line.get_color(), label=name)
    ax_kappa.axhline(1.0, color="k", ls="--", lw=1)
    ax_kappa.set(xscale="log", yscale="log", xlabel="condition number kappa",
                 ylabel="excess risk / (d sigma^2 / T)", title=f"Tuned schedules, T={horizon}")
    ax_t.axhline(1.0, color="k", ls="--", lw=1)
    ax_t.set(xscale="log", yscale="log", xlabel="horizon T",
             ylabel="excess risk / (d sigma^2 / T)", title=f"kappa={max(kappas):g}")
    for ax in (ax_shape, ax_kappa, ax_t):
        ax.grid(True, which="both", alpha=0.3)
    ax_shape.legend(fontsize=7)
    ax_kappa.legend(fontsize=7)
    fig.tight_layout()
    return _common.save_figure(fig, outdir, "lr_decay", dpi)


def write_results(result, outdir):
    """`outdir/lr_decay.json`: the numbers the printout and README quote, with the machine."""
    record = {"dim": result["dim"], "sigma": result["sigma"],
              "spectrum": result["spectrum"], "kappas": result["kappas"],
              "horizons": result["horizons"],
              "results": {str(t): {str(k): by_kappa for k, by_kappa in by_t.items()}
                          for t, by_t in result["results"].items()},
              "slopes": {str(t): s for t, s in result["slopes"].items()},
              "claims": claims(result)}
    return _common.write_results("lr_decay", record, outdir)


def main(argv):
    del argv
    kappas = _common.numbers(FLAGS.kappas)
    horizons = _common.numbers(FLAGS.horizons, int)
    multipliers = tuple(_common.numbers(FLAGS.lr_multipliers))
    result = run(kappas, horizons, FLAGS.dim, FLAGS.sigma, FLAGS.spectrum, multipliers,
                 tuple(_common.numbers(FLAGS.end_ratios)), FLAGS.tune_seeds, FLAGS.seeds,
                 FLAGS.seed)
    print(f"excess risk / (d sigma^2 / T), d={FLAGS.dim}, sigma={FLAGS.sigma}, spectrum="
          f"{FLAGS.spectrum}; peak lr tuned over {len(multipliers)} values "
          f"[{min(multipliers):.3g}, {max(multipliers):.3g}] / tr(Sigma) on {FLAGS.tune_seeds} "
          f"problems, reported on {FLAGS.seeds} fresh ones: mean +- 95% interval, tuned lr "
          "(* = at the edge of the grid)")
    for total_steps in horizons:
        print(f"T={total_steps}")
        print("  " + "schedule".ljust(22) + "".join(f"kappa={k:g}".rjust(24) for k in kappas)
              + "slope".rjust(8))
        for name in SCHEDULES:
            cells = []
            for k in kappas:
                r = result["results"][total_steps][k][name]
                tuned = f"lr={r['lr']:.3g}" + ("*" if r["lr_at_grid_edge"] else "")
                cells.append(f"{r['ratio']:.2f}+-{r['half_width']:.2f} {tuned}".rjust(24))
            print("  " + name.ljust(22) + "".join(cells)
                  + f"{result['slopes'][total_steps][name]:8.2f}")
    summary = claims(result)
    paired = summary["cosine_over_eigencurve_paired"]
    print(f"seed's ordering at kappa={summary['kappa']:g}, T={summary['total_steps']}: "
          f"polynomial worst: {summary['polynomial_worst']}; step beats polynomial: "
          f"{summary['step_beats_polynomial']}; eigencurve and cosine the best two final "
          f"iterates: {summary['eigencurve_and_cosine_best_two']}; cosine / eigencurve = "
          f"{summary['cosine_over_eigencurve']:.2f} (paired over problems "
          f"{paired['ratio']:.2f}, 95% [{paired['low']:.2f}, {paired['high']:.2f}]; within 10%: "
          f"{summary['cosine_within_10pct_of_eigencurve']}); polynomial slope in kappa "
          f"largest: {summary['polynomial_slope_largest']}")
    low, high = summary["eigencurve_over_cosine_lr_middle"]
    print(f"tuned eigencurve lr / tuned cosine lr over steps 0.1T..0.9T: {low:.2f} to {high:.2f}")
    print("saved", plot(result, FLAGS.outdir, FLAGS.dpi))
    print("saved", write_results(result, FLAGS.outdir))


if __name__ == "__main__":
    _common.define_number_list("kappas", ["10", "100", "1000"], "Condition numbers.",
                               check=lambda k: k > 1, requirement="numbers > 1")
    _common.define_number_list("horizons", ["10000", "100000"], "Step counts T, one run each.",
                               parse=int, check=lambda t: t >= 4, requirement="integers >= 4")
    _common.define_number_list("lr_multipliers", [f"{m:.6g}" for m in DEFAULT_LR_MULTIPLIERS],
                               "Peak learning rates tried for every schedule, times 1/tr(Sigma).")
    _common.define_number_list("end_ratios", ["0.1", "0.01", "0.001"],
                               "Final / peak lr tried for the polynomial decays.",
                               check=lambda r: 0 < r < 1, requirement="numbers in (0, 1)")
    flags.DEFINE_integer("dim", 100, "Dimension d.", lower_bound=2)
    flags.DEFINE_float("sigma", 1.0, "Label noise standard deviation (> 0).")
    flags.register_validator("sigma", lambda s: s > 0, message="--sigma must be positive")
    flags.DEFINE_enum("spectrum", "harmonic", SPECTRA,
                      "harmonic: 1/(1 + (kappa-1)(i-1)/(d-1)); power: i^-p with d^p = kappa.")
    flags.DEFINE_integer("tune_seeds", 4, "Random problems the lr is tuned on.", lower_bound=1)
    flags.DEFINE_integer("seeds", 16, "Fresh random problems reported.", lower_bound=2)
    flags.DEFINE_integer("seed", 0, "Random seed.")
    _common.define_output_flags()
    FLAGS = flags.FLAGS
    cli.run(main)
