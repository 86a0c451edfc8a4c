"""Schedules against closed forms in numpy, optax's warmup-cosine, jit and inject_hyperparams."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ravine.optim import schedules

PEAK, INIT, END = 0.3, 0.01, 0.02


def values(schedule, steps):
    return np.asarray(schedule(jnp.asarray(steps)), np.float64)


def check(schedule, steps, expected, atol=1e-7):
    np.testing.assert_allclose(values(schedule, steps), expected, rtol=1e-6, atol=atol)


def cosine_decay(t, start, length, peak, end):
    """end + (peak - end) * 0.5 * (1 + cos(pi * (t - start) / length)), numpy float64."""
    return end + (peak - end) * 0.5 * (1 + np.cos(np.pi * (np.asarray(t) - start) / length))


def sgdr_by_walking(t, first_period, mult, peak, end):
    """SGDR oracle that walks period by period (no logarithms)."""
    out = []
    for step in t:
        start, length = 0.0, float(first_period)
        while step >= start + length:
            start, length = start + length, length * mult
        out.append(cosine_decay(step, start, length, peak, end))
    return np.array(out)


def test_constant():
    check(schedules.constant(0.7), [0, 1, 10 ** 6], [0.7] * 3)
    assert schedules.constant(0.7)(3).shape == ()


def test_warmup_is_linear_from_init_to_peak():
    warm = 10
    for schedule in [schedules.linear(PEAK, 100, warm, INIT, END),
                     schedules.warmup_cosine(PEAK, 100, warm, INIT, END),
                     schedules.wsd(PEAK, 100, warm, init_value=INIT),
                     schedules.cosine_restarts(PEAK, 20, warmup_steps=warm, init_value=INIT),
                     schedules.inverse_sqrt(PEAK, warm, init_value=INIT)]:
        steps = np.arange(warm + 1)
        check(schedule, steps, INIT + (PEAK - INIT) * steps / warm)


def test_linear_decay():
    schedule = schedules.linear(PEAK, total_steps=110, warmup_steps=10, end_value=END)
    steps = np.arange(10, 111)
    check(schedule, steps, PEAK + (END - PEAK) * (steps - 10) / 100)
    check(schedule, [60], [(PEAK + END) / 2])  # decay midpoint


def test_warmup_cosine_formula_and_default_end():
    schedule = schedules.warmup_cosine(PEAK, total_steps=110, warmup_steps=10, end_value=END)
    steps = np.arange(10, 111)
    check(schedule, steps, cosine_decay(steps, 10, 100, PEAK, END))
    check(schedule, [60], [(PEAK + END) / 2])  # cosine midpoint
    default_end = schedules.warmup_cosine(PEAK, total_steps=110, warmup_steps=10)
    check(default_end, [60, 110], [(PEAK + 0.1 * PEAK) / 2, 0.1 * PEAK])


@pytest.mark.parametrize("warmup, init, end", [(0, 0.0, 0.0), (10, INIT, END), (25, 0.0, 0.1)])
def test_warmup_cosine_equals_optax(warmup, init, end):
    ours = schedules.warmup_cosine(PEAK, 100, warmup, init, end)
    theirs = optax.warmup_cosine_decay_schedule(init, PEAK, warmup, 100, end)
    steps = jnp.arange(130)
    np.testing.assert_allclose(ours(steps), theirs(steps), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("shape, tail", [
    ("linear", lambda f: 1 - f),
    ("cosine", lambda f: 0.5 * (1 + np.cos(np.pi * f))),
    ("sqrt", lambda f: 1 - np.sqrt(f)),
])
def test_wsd_plateau_and_decay_shapes(shape, tail):
    schedule = schedules.wsd(PEAK, total_steps=100, warmup_steps=10, decay_steps=40,
                             end_value=END, decay_shape=shape)
    check(schedule, np.arange(10, 61), np.full(51, PEAK))  # stable until T - decay_steps
    steps = np.arange(60, 101)
    check(schedule, steps, END + (PEAK - END) * tail((steps - 60) / 40))
    check(schedule, [70, 80], [END + (PEAK - END) * tail(0.25), END + (PEAK - END) * tail(0.5)])


def test_wsd_default_decay_is_a_fifth_of_training():
    schedule = schedules.wsd(PEAK, total_steps=100)
    steps = np.arange(101)
    expected = np.where(steps <= 80, PEAK, PEAK * (1 - (steps - 80) / 20))
    check(schedule, steps, expected)


@pytest.mark.parametrize("make, total", [
    (lambda: schedules.linear(PEAK, 50, 10, INIT, END), 50),
    (lambda: schedules.warmup_cosine(PEAK, 50, 10, INIT, END), 50),
    (lambda: schedules.wsd(PEAK, 50, 10, end_value=END, decay_shape="sqrt"), 50),
    (lambda: schedules.warmup_cosine(PEAK, 10, 10, INIT, END), 10),  # no room to decay
    (lambda: schedules.wsd(PEAK, 50, 10, decay_steps=0, end_value=END), 50),
])
def test_stays_at_end_value_from_total_steps_on(make, total):
    check(make(), [total, total + 1, 10 * total, 10 ** 7], [END] * 4)


def test_zero_length_decay_is_a_step_at_total_steps():
    schedule = schedules.wsd(PEAK, 50, 10, decay_steps=0, end_value=END)
    check(schedule, [10, 49, 50], [PEAK, PEAK, END])


@pytest.mark.parametrize("mult", [1.0, 2.0, 1.5, 1.1])
def test_cosine_restarts_matches_sgdr(mult):
    first = 8
    schedule = schedules.cosine_restarts(PEAK, first, period_mult=mult, end_value=END)
    steps = np.arange(400)
    # The schedule works in float32, with the float32 value of the multiplier (1.1 is not
    # exact); a fractional period start carries float32 rounding (ulp(80) = 8e-6).
    expected = sgdr_by_walking(steps, first, float(np.float32(mult)), PEAK, END)
    check(schedule, steps, expected, atol=2e-6)


def test_cosine_restarts_far_boundary():
    # Period 13 starts at 8 * (2**13 - 1) = 65528, where float32 log2 says period 12.
    schedule = schedules.cosine_restarts(PEAK, 8, period_mult=2.0, end_value=END)
    steps = np.arange(65526, 65531)
    check(schedule, steps, sgdr_by_walking(steps, 8, 2.0, PEAK, END))


@pytest.mark.parametrize("mult, starts", [(1.0, [0, 10, 20, 30]), (2.0, [0, 10, 30, 70, 150])])
def test_cosine_restarts_boundaries(mult, starts):
    schedule = schedules.cosine_restarts(PEAK, 10, period_mult=mult, end_value=END,
                                         warmup_steps=5)
    starts = np.array(starts) + 5
    lengths = 10 * mult ** np.arange(len(starts))
    check(schedule, starts, np.full(len(starts), PEAK))  # every period restarts at the peak
    check(schedule, starts + lengths / 2, np.full(len(starts), (PEAK + END) / 2))
    check(schedule, starts + lengths - 1, cosine_decay(lengths - 1, 0, lengths, PEAK, END))


def test_inverse_sqrt():
    warm = 16
    schedule = schedules.inverse_sqrt(PEAK, warm)
    check(schedule, [warm, 4 * warm, 100 * warm], [PEAK, PEAK / 2, PEAK / 10])
    steps = np.arange(warm, 500)
    check(schedule, steps, PEAK * np.sqrt(warm / steps))


ALL = {
    "constant": lambda: schedules.constant(PEAK),
    "linear": lambda: schedules.linear(PEAK, 40, 5, INIT, END),
    "warmup_cosine": lambda: schedules.warmup_cosine(PEAK, 40, 5, INIT),
    "wsd": lambda: schedules.wsd(PEAK, 40, 5, decay_steps=12, decay_shape="cosine"),
    "cosine_restarts": lambda: schedules.cosine_restarts(PEAK, 6, 2.0, END, 3),
    "inverse_sqrt": lambda: schedules.inverse_sqrt(PEAK, 5),
}


@pytest.mark.parametrize("name", sorted(ALL))
def test_jit_vector_and_python_steps_agree(name):
    schedule = ALL[name]()
    steps = np.arange(50)
    vector = jax.jit(schedule)(jnp.asarray(steps, jnp.int32))
    assert vector.dtype == jnp.float32 and vector.shape == (50,)
    scalar_jit = jax.jit(schedule)
    np.testing.assert_allclose(vector, [schedule(int(t)) for t in steps], rtol=1e-6)
    np.testing.assert_allclose(vector, [scalar_jit(jnp.int32(t)) for t in steps], rtol=1e-6)


@pytest.mark.parametrize("name", sorted(ALL))
def test_inject_hyperparams_uses_the_schedule(name):
    schedule = ALL[name]()
    tx = optax.inject_hyperparams(optax.sgd)(learning_rate=schedule)
    params = {"w": jnp.ones(3)}
    grads = {"w": jnp.array([1.0, -2.0, 0.5])}
    state = tx.init(params)
    update = jax.jit(tx.update)
    for t in range(12):
        updates, state = update(grads, state, params)
        np.testing.assert_allclose(updates["w"], -schedule(t) * grads["w"], rtol=1e-6)
        np.testing.assert_allclose(state.hyperparams["learning_rate"], schedule(t), rtol=1e-6)


def test_as_optimizer_learning_rate():
    schedule = ALL["wsd"]()
    tx = optax.sgd(learning_rate=schedule)
    grads = {"w": jnp.array([1.0, -2.0])}
    state = tx.init(grads)
    for t in range(3):
        updates, state = tx.update(grads, state)
        np.testing.assert_allclose(updates["w"], -schedule(t) * grads["w"], rtol=1e-6)


@pytest.mark.parametrize("make, message", [
    (lambda: schedules.constant(-1.0), "value"),
    (lambda: schedules.linear(-0.1, 10), "peak_value"),
    (lambda: schedules.linear(0.1, 0), "total_steps"),
    (lambda: schedules.linear(0.1, 10, warmup_steps=-1), "warmup_steps"),
    (lambda: schedules.linear(0.1, 10, warmup_steps=11), "warmup_steps .* 11"),
    (lambda: schedules.linear(0.1, 10, init_value=-1.0), "init_value"),
    (lambda: schedules.warmup_cosine(0.1, 10, end_value=-0.5), "end_value"),
    (lambda: schedules.warmup_cosine(0.1, 10.5), "total_steps"),
    (lambda: schedules.wsd(0.1, 10, decay_shape="exp"), "decay_shape .* 'exp'"),
    (lambda: schedules.wsd(0.1, 10, warmup_steps=4, decay_steps=7), "decay_steps .* 7"),
    (lambda: schedules.wsd(0.1, 10, decay_steps=-2), "decay_steps"),
    (lambda: schedules.cosine_restarts(0.1, 0), "first_period .* 0"),
    (lambda: schedules.cosine_restarts(0.1, 5, period_mult=0.5), "period_mult .* 0.5"),
    (lambda: schedules.cosine_restarts(0.1, 5, warmup_steps=-3), "warmup_steps"),
    (lambda: schedules.inverse_sqrt(0.1, 0), "warmup_steps .* 0"),
    (lambda: schedules.inverse_sqrt(float("nan"), 5), "peak_value"),
])
def test_invalid_hyperparameters_raise(make, message):
    with pytest.raises(ValueError, match=message):
        make()
