"""AlgoPerf scores, performance profiles, data speedups and ranking stability (scoring.py)."""
import itertools
import math

import numpy as np
import pytest

from ravine.experiments import scoring

INF = math.inf

# Three optimizers on three workloads: a tie on w2 (a and b), a miss on w3 (a).
#   ratios   w1    w2    w3
#   a        1     1     inf
#   b        2     1     1
#   c        5     2.5   2
TIMES = {
    "a": {"w1": 10.0, "w2": 40.0, "w3": INF},
    "b": {"w1": 20.0, "w2": 40.0, "w3": 30.0},
    "c": {"w1": 50.0, "w2": 100.0, "w3": 60.0},
}


def test_algoperf_score_by_hand():
    # A ratio r <= 4 earns (4 - r) / 3 of a workload: 1 -> 1, 2 -> 2/3, 2.5 -> 1/2, 5 -> 0.
    scores = scoring.algoperf_score(TIMES)
    assert scores == pytest.approx({"a": (1 + 1 + 0) / 3,
                                    "b": (2 / 3 + 1 + 1) / 3,
                                    "c": (0 + 1 / 2 + 2 / 3) / 3}, rel=1e-12)
    # r_max = 2: only ratios <= 2 earn (2 - r) / 1.
    assert scoring.algoperf_score(TIMES, r_max=2.0) == pytest.approx(
        {"a": 2 / 3, "b": 2 / 3, "c": 0.0}, abs=1e-12)


def test_a_workload_everyone_missed_counts_for_no_one():
    times = {name: {**row, "w4": INF} for name, row in TIMES.items()}
    assert scoring.algoperf_score(times) == pytest.approx(
        {"a": 2 / 4, "b": (2 / 3 + 2) / 4, "c": (1 / 2 + 2 / 3) / 4}, rel=1e-12)


def test_scores_do_not_depend_on_each_workloads_unit():
    rescaled = {name: {w: t * (7.0 if w == "w1" else 1e-3) for w, t in row.items()}
                for name, row in TIMES.items()}
    assert scoring.algoperf_score(rescaled) == pytest.approx(scoring.algoperf_score(TIMES))


def test_score_is_the_integral_of_the_profile():
    taus = np.linspace(1.0, 4.0, 300_001)
    profiles = scoring.performance_profile(TIMES, taus)
    scores = scoring.algoperf_score(TIMES)
    for name, rho in profiles.items():
        numeric = np.trapezoid(rho, taus) / 3.0
        assert numeric == pytest.approx(scores[name], abs=1e-5)


def test_performance_profile_at_given_taus():
    taus = [0.5, 1.0, 2.0, 2.5, 4.0, 5.0, INF]
    profiles = scoring.performance_profile(TIMES, taus)
    np.testing.assert_array_equal(profiles["a"], [0, 2 / 3, 2 / 3, 2 / 3, 2 / 3, 2 / 3, 2 / 3])
    np.testing.assert_array_equal(profiles["b"], [0, 2 / 3, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(profiles["c"], [0, 0, 1 / 3, 2 / 3, 2 / 3, 1, 1])


def test_bootstrap_score_over_studies():
    # a always takes 1. b's studies are {1, 4, 4}: median 4 (ratio 4, score 0); a resample
    # with two or three copies of the 1 (probability 7/27) has median 1 (a tie, score 1).
    study_times = {"a": {"w": [1.0, 1.0, 1.0]}, "b": {"w": [1.0, 4.0, 4.0]}}
    result = scoring.bootstrap_score(study_times, num_resamples=2000, seed=0)
    assert result["a"] == (1.0, 1.0, 1.0)
    assert result["b"] == (0.0, 0.0, 1.0)
    # One study each: every resample is the data, the interval collapses onto the score.
    single = scoring.bootstrap_score({n: {w: [t] for w, t in row.items()}
                                      for n, row in TIMES.items()}, num_resamples=50)
    for name, score in scoring.algoperf_score(TIMES).items():
        assert single[name].score == single[name].low == single[name].high \
            == pytest.approx(score)


@pytest.mark.parametrize("times,match", [
    ({}, "times must be a non-empty mapping"),
    ({"a": {"w1": 1.0}, "b": {"w2": 1.0}}, r"times\['b'\] must have the workloads \['w1'\]"),
    ({"a": {"w1": -1.0}}, r"times\['a'\]\['w1'\] must be > 0"),
    ({"a": {"w1": math.nan}}, r"times\['a'\]\['w1'\] must be > 0"),
    ({"a": {"w1": "fast"}}, r"times\['a'\]\['w1'\] must be a number"),
])
def test_bad_times_are_rejected(times, match):
    with pytest.raises(ValueError, match=match):
        scoring.algoperf_score(times)


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="r_max must be a finite number > 1, got 1.0"):
        scoring.algoperf_score(TIMES, r_max=1.0)
    with pytest.raises(ValueError, match="taus must be"):
        scoring.performance_profile(TIMES, [1.0, math.nan])
    with pytest.raises(ValueError, match=r"study_times\['a'\] must have the same number"):
        scoring.bootstrap_score({"a": {"w1": [1.0, 2.0], "w2": [1.0]}})
    with pytest.raises(ValueError, match="confidence must be in"):
        scoring.bootstrap_score({"a": {"w1": [1.0]}}, confidence=1.5)


# --- data speedup ---------------------------------------------------------------------------

def power_law(tokens, E=1.8, B=400.0, beta=0.3):
    return E + B * np.asarray(tokens, float) ** -beta


BASE_TOKENS = np.array([1e7, 2e7, 4e7])  # 1x, 2x, 4x


def test_data_speedup_recovers_a_known_speedup():
    # The optimizer reaches at 1e7 tokens the loss the baseline reaches at 1.4e7: 1.4x.
    base_losses = power_law(BASE_TOKENS)
    speedup = scoring.data_speedup(BASE_TOKENS, base_losses, 1e7, float(power_law(1.4e7)))
    assert speedup == pytest.approx(1.4, rel=1e-6)
    fit = scoring.fit_loss_curve(BASE_TOKENS, base_losses)
    assert (fit.E, fit.B, fit.beta) == pytest.approx((1.8, 400.0, 0.3), rel=1e-6)
    assert fit.relative_residual < 1e-8
    # Extrapolation on the fitted law: beyond the largest run, and below the smallest.
    assert scoring.data_speedup(BASE_TOKENS, base_losses, 1e7, float(power_law(6e7))) \
        == pytest.approx(6.0, rel=1e-5)
    assert scoring.data_speedup(BASE_TOKENS, base_losses, 1e7, float(power_law(0.5e7))) \
        == pytest.approx(0.5, rel=1e-5)
    # At or below the baseline's floor E it never gets there.
    assert scoring.data_speedup(BASE_TOKENS, base_losses, 1e7, 1.8) == math.inf


def test_data_speedup_with_another_curve_and_noise():
    # Four points, different constants, 0.1% noise: still close to 2x.
    tokens = np.array([1e6, 2e6, 4e6, 8e6])
    noise = 1 + 1e-3 * np.array([1.0, -1.0, 0.5, -0.5])
    losses = power_law(tokens, E=2.5, B=60.0, beta=0.25) * noise
    target = float(power_law(6e6, E=2.5, B=60.0, beta=0.25))
    assert scoring.data_speedup(tokens, losses, 3e6, target) == pytest.approx(2.0, rel=0.05)


def test_data_speedup_falls_back_to_log_log_interpolation():
    # A sudden drop between 2 and 4 tokens: no saturating power law fits (residual > 5%).
    tokens = np.array([1.0, 2.0, 4.0, 8.0])
    losses = np.array([3.0, 2.9, 2.0, 1.95])
    assert scoring.fit_loss_curve(tokens, losses).relative_residual > 0.05
    # log L is linear in log D between (2, 2.9) and (4, 2.0): loss 2.45 at
    # D = 2 * 2^t, t = ln(2.45 / 2.9) / ln(2.0 / 2.9) = 0.45381 -> D = 2.7393.
    t = math.log(2.45 / 2.9) / math.log(2.0 / 2.9)
    expected = 2.0 * 2.0 ** t
    assert expected == pytest.approx(2.7393, abs=1e-4)
    assert scoring.data_speedup(tokens, losses, 1.0, 2.45) == pytest.approx(expected, rel=1e-12)
    assert scoring.data_speedup(tokens, losses, 2.0, 2.45, method="interpolate") \
        == pytest.approx(expected / 2, rel=1e-12)
    assert scoring.data_speedup(tokens, losses, 1.0, 2.45, method="power_law") \
        != pytest.approx(expected, rel=0.01)
    # Below every run: the last segment, slope ln(1.95/2)/ln 2, extended.
    slope = math.log(1.95 / 2.0) / math.log(2.0)
    assert scoring.data_speedup(tokens, losses, 1.0, 1.9) == pytest.approx(
        8.0 * math.exp(math.log(1.9 / 1.95) / slope), rel=1e-12)


def test_data_speedup_with_two_points_interpolates():
    # L = 5 D^-0.1 through two runs: reaching L(3) with 1 token is a 3x speedup.
    tokens = np.array([1.0, 10.0])
    losses = 5.0 * tokens ** -0.1
    assert scoring.data_speedup(tokens, losses, 1.0, 5.0 * 3.0 ** -0.1) == pytest.approx(3.0)
    # A curve that does not fall never reaches a lower loss.
    assert scoring.data_speedup(tokens, [2.0, 2.0], 1.0, 1.5) == math.inf


@pytest.mark.parametrize("args,kwargs,match", [
    (([1e7, 2e7], [3.0], 1e7, 2.5), {}, "base_losses must be 2 finite numbers"),
    (([1e7, -2e7], [3.0, 2.8], 1e7, 2.5), {}, "base_tokens must be >= 2 distinct"),
    (([1e7, 1e7], [3.0, 2.8], 1e7, 2.5), {}, "base_tokens must be >= 2 distinct"),
    (([1e7, 2e7], [3.0, 2.8], 0.0, 2.5), {}, "tokens must be a finite number > 0, got 0.0"),
    (([1e7, 2e7], [3.0, 2.8], 1e7, math.nan), {}, "loss must be a finite number, got nan"),
    (([1e7, 2e7], [3.0, 2.8], 1e7, 2.5), {"method": "spline"}, "method must be one of"),
    (([1e7, 2e7], [3.0, 2.8], 1e7, 2.5), {"method": "power_law"}, "needs >= 3 points"),
])
def test_data_speedup_rejects_bad_inputs(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        scoring.data_speedup(*args, **kwargs)


# --- ranking stability ----------------------------------------------------------------------

FINAL = {"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0, "e": 5.0}


def test_ranking_stability_by_hand():
    rankings = {
        400: dict(FINAL),                                              # tau 1
        100: {"a": 5.0, "b": 4.0, "c": 3.0, "d": 2.0, "e": 1.0},       # reversed: tau -1
        300: {"a": 2.0, "b": 1.0, "c": 3.0, "d": 4.0, "e": 5.0},       # 1 of 10 pairs: 0.8
        200: {"a": 3.0, "b": 2.0, "c": 1.0, "d": 4.0, "e": 5.0},       # 3 of 10 pairs: 0.4
    }
    result = scoring.ranking_stability(rankings, FINAL)
    np.testing.assert_array_equal(result.steps, [100, 200, 300, 400])
    np.testing.assert_allclose(result.taus, [-1.0, 0.4, 0.8, 1.0], atol=1e-12)
    assert result.stable_from == 300
    # A flip after it was settled resets the step.
    rankings[300], rankings[200] = rankings[200], rankings[300]
    assert scoring.ranking_stability(rankings, FINAL).stable_from == 400
    # Settled from the start; a fully tied evaluation (tau NaN) counts as unsettled.
    assert scoring.ranking_stability({0: FINAL, 1: FINAL}, FINAL).stable_from == 0
    tied = scoring.ranking_stability({0: dict.fromkeys(FINAL, 1.0), 5: FINAL}, FINAL)
    assert math.isnan(tied.taus[0]) and tied.stable_from == 5
    # Never settled.
    assert scoring.ranking_stability({0: FINAL, 1: rankings[100]}, FINAL).stable_from is None


def test_ranking_stability_rejects_bad_inputs():
    with pytest.raises(ValueError, match=r"rankings_over_time\[7\] must rank the optimizers"):
        scoring.ranking_stability({7: {"a": 1.0}}, FINAL)
    with pytest.raises(ValueError, match="final must map >= 2 optimizers"):
        scoring.ranking_stability({0: {"a": 1.0}}, {"a": 1.0})
    with pytest.raises(ValueError, match="threshold must be in"):
        scoring.ranking_stability({0: FINAL}, FINAL, threshold=2.0)


# ------------------------------------------------------------------ tuning budget curves

def test_expected_best_is_the_mean_minimum_over_every_draw():
    values = [0.31, 0.12, 0.5, 0.12, 0.27]   # a tie included
    ks = [1, 2, 3, 4]
    by_enumeration = [np.mean([min(draw) for draw in itertools.product(values, repeat=k)])
                      for k in ks]
    np.testing.assert_allclose(scoring.expected_best(values, ks), by_enumeration, rtol=1e-12)
    assert scoring.expected_best(values, [1])[0] == pytest.approx(np.mean(values))
    assert scoring.expected_best(values, [500])[0] == pytest.approx(0.12)


def test_bootstrap_expected_best_brackets_the_curve_and_is_seeded():
    values = np.random.default_rng(0).uniform(0.1, 1.0, 15)
    ks = np.arange(1, 16)
    low, high = scoring.bootstrap_expected_best(values, ks, num_resamples=400, seed=3)
    curve = scoring.expected_best(values, ks)
    assert (low <= curve).all() and (curve <= high).all() and (low < high).all()
    assert (np.diff(low) <= 1e-12).all()   # more trials never expect a worse best
    again = scoring.bootstrap_expected_best(values, ks, num_resamples=400, seed=3)
    np.testing.assert_array_equal(again[0], low)
    # the resampled trials: their curve's lower quantile sits at the best's neighbourhood
    assert low[-1] >= values.min() and high[0] <= values.max()


@pytest.mark.parametrize("args, match", [
    (([], [1]), "values"), (([1.0, np.inf], [1]), "values"), (([1.0], [0]), "ks"),
    (([1.0], [1.5]), "ks")])
def test_expected_best_rejects_bad_inputs(args, match):
    with pytest.raises(ValueError, match=match):
        scoring.expected_best(*args)
    with pytest.raises(ValueError, match=match):
        scoring.bootstrap_expected_best(*args)
    with pytest.raises(ValueError, match="num_resamples"):
        scoring.bootstrap_expected_best([1.0], [1], num_resamples=0)
