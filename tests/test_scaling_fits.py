"""Scaling-law fits on synthetic data with known parameters (experiments/scaling.py)."""
import math

import numpy as np
import pytest

from ravine.experiments import scaling

# Chinchilla's approach-3 fit (Hoffmann et al. 2022, Eq. 10).
E, A, B, ALPHA, BETA = 1.69, 406.4, 410.7, 0.34, 0.28
CHINCHILLA_A = BETA / (ALPHA + BETA)  # 0.4516: N_opt ~ C^a
# The compute-optimal N under C = 6 N D: N_opt = G (C / 6)^a with
# G = (alpha A / (beta B))^(1 / (alpha + beta)) (Hoffmann et al. 2022, Appendix D.2).
G = (ALPHA * A / (BETA * B)) ** (1 / (ALPHA + BETA))
BUDGETS = (1e18, 1e19, 1e20, 1e21)


def chinchilla_loss(params, tokens):
    return E + A / params ** ALPHA + B / tokens ** BETA


def n_opt(flops):
    return G * (flops / 6) ** CHINCHILLA_A


def isoflop_records(offsets=(1.0, 1.0, 1.0, 1.0), sizes=5):
    """Per budget `sizes` models spanning 16x around offset * N_opt, D = C / (6 N)."""
    records = []
    for flops, offset in zip(BUDGETS, offsets):
        for params in offset * n_opt(flops) * np.geomspace(1 / 4, 4, sizes):
            tokens = flops / (6 * params)
            records.append({"flops": flops, "params": params, "tokens": tokens,
                            "loss": chinchilla_loss(params, tokens)})
    return records


def test_fit_power_law_is_exact_on_a_power_law():
    x = np.array([1.0, 10.0, 100.0, 1000.0])
    assert scaling.fit_power_law(x, 3.0 * x ** -0.5) == pytest.approx((3.0, -0.5), rel=1e-10)
    assert scaling.fit_power_law([2.0, 8.0], [5.0, 20.0]) == pytest.approx((2.5, 1.0))


def test_isoflop_recovers_chinchillas_exponents():
    # Sizes centred on each budget's optimum: every profile is the same curve shifted in
    # log N and scaled, so the parabolas' (biased) vertices shift exactly with N_opt.
    result = scaling.fit_isoflop(isoflop_records())
    assert result.a == pytest.approx(CHINCHILLA_A, abs=1e-6)
    assert result.a + result.b == pytest.approx(1.0, abs=1e-9)  # D_opt = C / (6 N_opt)
    assert [c for c, _, _ in result.optima] == list(BUDGETS)
    for flops, n, d in result.optima:
        # A parabola in log N is not the exact profile: its vertex is 1.6% off here.
        assert n == pytest.approx(n_opt(flops), rel=0.03)
        assert d == pytest.approx(flops / (6 * n), rel=1e-9)
    assert result.extrapolated == ()


def test_isoflop_with_off_centre_sizes_stays_close():
    # Sizes centred up to 2x away from the optimum, differently per budget: a within 0.005
    # (measured: 0.4524 and 0.4508 for these offsets, 0.4516 exact).
    for offsets in [(1.5, 0.7, 1.3, 0.8), (2.0, 0.5, 2.0, 0.5)]:
        result = scaling.fit_isoflop(isoflop_records(offsets))
        assert result.a == pytest.approx(CHINCHILLA_A, abs=0.005)
        assert result.b == pytest.approx(1 - CHINCHILLA_A, abs=0.005)


def test_isoflop_flags_an_optimum_outside_the_sampled_sizes():
    result = scaling.fit_isoflop(isoflop_records(offsets=(1.0, 1.0, 1.0, 8.0)))
    assert result.extrapolated == (1e21,)


def test_bootstrap_isoflop_interval_covers_the_truth():
    rng = np.random.default_rng(0)
    records = [dict(r, loss=r["loss"] * math.exp(2e-3 * rng.normal()), seed=s)
               for s in range(3) for r in isoflop_records(sizes=6)]
    for group_by in (None, "seed"):
        interval = scaling.bootstrap_isoflop(records, num_resamples=200, group_by=group_by)
        low, high = interval.a
        assert low < CHINCHILLA_A < high and high - low < 0.05, interval.a
        assert interval.b[0] < 1 - CHINCHILLA_A < interval.b[1]
        assert interval.dropped == 0 and interval.a_samples.shape == (200,)


def surface_records(noise=0.0, seed=0):
    rng = np.random.default_rng(seed)
    return [{"params": n, "tokens": d,
             "loss": chinchilla_loss(n, d) * math.exp(noise * rng.normal())}
            for n in np.geomspace(1e7, 1e10, 7) for d in np.geomspace(1e9, 1e12, 7)]


def test_loss_surface_is_exact_on_noiseless_data():
    fit = scaling.fit_loss_surface(surface_records(), num_starts=2)
    assert (fit.E, fit.A, fit.B, fit.alpha, fit.beta) == pytest.approx(
        (E, A, B, ALPHA, BETA), rel=1e-6)
    assert fit.a == pytest.approx(CHINCHILLA_A, rel=1e-6)
    assert fit.b == pytest.approx(1 - CHINCHILLA_A, rel=1e-6)
    assert fit(1e8, 1e10) == pytest.approx(chinchilla_loss(1e8, 1e10), rel=1e-9)


def test_loss_surface_with_noise_recovers_chinchillas_constants():
    # 0.1% multiplicative noise on 49 runs. Largest errors over noise seeds 0-5 (seed 0
    # here): E 0.0094, A 4.1%, B 3.6%, alpha 0.0026, beta 0.0018, a 0.0009; the
    # tolerances are about twice those (A and B trade off against alpha, beta and E).
    fit = scaling.fit_loss_surface(surface_records(noise=1e-3))
    assert fit.E == pytest.approx(E, abs=0.02)
    assert fit.A == pytest.approx(A, rel=0.1)
    assert fit.B == pytest.approx(B, rel=0.1)
    assert fit.alpha == pytest.approx(ALPHA, abs=0.01)
    assert fit.beta == pytest.approx(BETA, abs=0.01)
    assert fit.a == pytest.approx(CHINCHILLA_A, abs=0.005)


def test_critical_batch_is_exact_on_mccandlish_curve():
    batch_sizes = np.array([16, 32, 64, 128, 256, 512, 1024, 2048], float)
    steps = 1000.0 * (1 + 256.0 / batch_sizes)
    assert scaling.fit_critical_batch(batch_sizes, steps) == pytest.approx((1000.0, 256.0),
                                                                          rel=1e-9)
    # Any order; perfect scaling throughout: no saturation seen; no gain at all: 0.
    assert scaling.fit_critical_batch(batch_sizes[::-1], steps[::-1]) == pytest.approx(
        (1000.0, 256.0), rel=1e-9)
    assert scaling.fit_critical_batch(batch_sizes, 1e5 / batch_sizes) == (0.0, math.inf)
    assert scaling.fit_critical_batch(batch_sizes, np.full(8, 50.0)) == pytest.approx(
        (50.0, 0.0))


def test_zhang_critical_batch_on_mccandlish_curve():
    # R(B) = S(B) B / (S(B0) B0) = (B + Bc) / (B0 + Bc); R = 1.2 at B* = 1.2 B0 + 0.2 Bc
    # = 24 + 80 = 104 for B0 = 20, Bc = 400.
    steps = lambda b: 500.0 * (1 + 400.0 / np.asarray(b, float))
    grid = [20.0, 40.0, 104.0, 200.0, 400.0]
    assert scaling.critical_batch_zhang(grid, steps(grid)) == pytest.approx(104.0, rel=1e-12)
    dense = np.geomspace(20, 2000, 25)  # 104 between grid points: log-log interpolation
    assert scaling.critical_batch_zhang(dense, steps(dense)) == pytest.approx(104.0, rel=0.01)
    # overshoot 1: R = 2 at B = 2 B0 + Bc = 440, beyond the grid (inf) or on it.
    assert scaling.critical_batch_zhang(grid, steps(grid), overshoot=1.0) == math.inf
    assert scaling.critical_batch_zhang(grid + [440.0, 800.0], steps(grid + [440.0, 800.0]),
                                        overshoot=1.0) == pytest.approx(440.0, rel=1e-12)


ISOFLOP_RECORD = {"flops": 1e18, "params": 1e7, "tokens": 1e10, "loss": 3.0}


@pytest.mark.parametrize("call,match", [
    (lambda: scaling.fit_power_law([1.0, -2.0], [1.0, 2.0]), r"x must be >= 2 finite numbers > 0"),
    (lambda: scaling.fit_power_law([1.0, 2.0], [1.0]), r"y must have one value per x \(2\)"),
    (lambda: scaling.fit_power_law([3.0, 3.0], [1.0, 2.0]), "x must hold >= 2 distinct"),
    (lambda: scaling.fit_isoflop([]), "records must not be empty"),
    (lambda: scaling.fit_isoflop([{"flops": 1e18, "params": 1e7, "loss": 3.0}]),
     r"records\[0\] has no 'tokens'"),
    (lambda: scaling.fit_isoflop([dict(ISOFLOP_RECORD, params=0.0)]),
     r"records\[0\]\['params'\] must be finite and > 0, got 0.0"),
    (lambda: scaling.fit_isoflop(isoflop_records()[:5]), "must span >= 2 flops budgets"),
    (lambda: scaling.fit_isoflop(isoflop_records()[:2] + isoflop_records()[5:10]),
     r"records at flops=1e\+18 need >= 3 distinct params"),
    (lambda: scaling.fit_isoflop([dict(r, loss=-r["loss"]) for r in isoflop_records()]),
     r"flops=1e\+18: loss against log\(params\) is not convex"),
    (lambda: scaling.bootstrap_isoflop(isoflop_records(), group_by="seed"),
     "group_by='seed': records"),
    (lambda: scaling.fit_loss_surface(surface_records()[:4]), "needs >= 5 records"),
    (lambda: scaling.fit_loss_surface(surface_records(), delta=0.0), "delta must be"),
    (lambda: scaling.fit_loss_surface([dict(r, loss=0.0) for r in surface_records()]),
     "'loss' must be > 0"),
    (lambda: scaling.fit_critical_batch([16.0], [10.0]), "batch_sizes must be >= 2"),
    (lambda: scaling.fit_critical_batch([16.0, 16.0], [10.0, 9.0]), "batch_sizes must be distinct"),
    (lambda: scaling.fit_critical_batch([16.0, 32.0], [10.0, -9.0]), "steps must be"),
    (lambda: scaling.critical_batch_zhang([16.0, 32.0], [10.0, 9.0], overshoot=0.0),
     "overshoot must be a finite number > 0, got 0.0"),
])
def test_bad_inputs_are_rejected(call, match):
    with pytest.raises(ValueError, match=match):
        call()
