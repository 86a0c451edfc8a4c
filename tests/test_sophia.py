"""Sophia against the paper's algorithm in numpy and optax.contrib.sophia; its estimators."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ravine import optim
from ravine.optim import sophia_estimates

N, D, C = 32, 5, 4  # examples, features, classes of the softmax regression


def _softmax_regression(seed=0):
    keys = jax.random.split(jax.random.key(seed), 3)
    inputs = jax.random.normal(keys[0], (N, D))
    labels = jax.random.randint(keys[1], (N,), 0, C)
    params = {"w": 0.5 * jax.random.normal(keys[2], (D, C)), "b": jnp.zeros((C,))}
    return inputs, labels, params


def _logits(params, inputs):
    return inputs @ params["w"] + params["b"]


def _loss(params, inputs, labels):
    logits = _logits(params, inputs)
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))


def _numpy_softmax(logits):
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _numpy_sophia_g(inputs, labels, w, b, sampled_labels, steps, lr, b1, b2, rho, eps, wd, k):
    """Algorithm 3 of the paper with the GNB estimator (Algorithm 2), in float64 numpy, in
    the official SophiaG code's form: decay `p *= 1 - lr wd`, `m` without bias correction,
    step `-lr sign(m) min(|m| / (rho h + eps), 1)`; h refreshed at steps t % k == 0 (the
    paper's t mod k = 1 counting from 1) before that step's update, from the gradient of the
    mean loss on labels sampled from the model's softmax, squared, times the batch size."""
    x = np.asarray(inputs, np.float64)
    w, b = np.asarray(w, np.float64), np.asarray(b, np.float64)
    m = {"w": np.zeros_like(w), "b": np.zeros_like(b)}
    h = {"w": np.zeros_like(w), "b": np.zeros_like(b)}

    def grads(w, b, y):
        residual = (_numpy_softmax(x @ w + b) - np.eye(C)[y]) / N
        return {"w": x.T @ residual, "b": residual.sum(axis=0)}

    for t in range(steps):
        g = grads(w, b, np.asarray(labels))
        if t % k == 0:
            g_hat = grads(w, b, sampled_labels(t, x @ w + b))
            h = {n: b2 * h[n] + (1 - b2) * N * g_hat[n] ** 2 for n in h}
        m = {n: b1 * m[n] + (1 - b1) * g[n] for n in m}
        step = {n: np.sign(m[n]) * np.minimum(np.abs(m[n]) / (rho * h[n] + eps), 1) for n in m}
        w = w * (1 - lr * wd) - lr * step["w"]
        b = b * (1 - lr * wd) - lr * step["b"]
    return w, b


@pytest.mark.parametrize("via", ["hessian_diag", "hessian_fn"])
def test_sophia_g_equals_the_papers_algorithm_on_softmax_regression(via):
    inputs, labels, params = _softmax_regression()
    lr, k, steps = 0.05, 3, 20
    # b1, rho and wd away from the defaults so each term shows (defaults are tested below).
    tx = optim.sophia(lr, b1=0.9, b2=0.95, rho=0.5, weight_decay=0.1, hessian_every=k)
    key_at = lambda t: jax.random.fold_in(jax.random.key(7), t)  # noqa: E731

    def sampled_labels(t, logits):
        return np.asarray(jax.random.categorical(key_at(t), jnp.asarray(logits, jnp.float32)))

    expected_w, expected_b = _numpy_sophia_g(
        inputs, labels, params["w"], params["b"], sampled_labels, steps, lr, 0.9, 0.95, 0.5,
        1e-15, 0.1, k)

    @jax.jit
    def step(params, state, t):
        grads = jax.grad(_loss)(params, inputs, labels)
        estimate = lambda p: sophia_estimates.gnb(_logits, p, inputs, key_at(t))  # noqa: E731
        if via == "hessian_fn":  # the transform refreshes on its own steps (lax.cond)
            updates, state = tx.update(grads, state, params, hessian_fn=estimate)
        else:  # the caller decides (here: the same steps), and the cond is ours
            updates, state = jax.lax.cond(
                t % k == 0, lambda: tx.update(grads, state, params, hessian_diag=estimate(params)),
                lambda: tx.update(grads, state, params))
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    for t in range(steps):
        params, state = step(params, state, t)
    np.testing.assert_allclose(params["w"], expected_w, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(params["b"], expected_b, rtol=1e-4, atol=1e-6)
    assert np.abs(np.asarray(params["w"]) - 0.5 * np.asarray(_softmax_regression()[2]["w"])
                  ).max() > 0  # it moved


def test_defaults_are_the_official_sophiag_ones():
    import inspect
    defaults = {name: p.default for name, p in inspect.signature(optim.sophia).parameters.items()}
    assert defaults["b1"] == 0.965 and defaults["b2"] == 0.99  # betas=(0.965, 0.99)
    assert defaults["rho"] == 0.04 and defaults["weight_decay"] == 0.1
    assert defaults["eps"] == 1e-15 and defaults["hessian_every"] == 10


def _passthrough_estimator():
    """For optax.contrib.sophia: returns the `hessian_diag` extra argument as the estimate."""
    def update(updates, state, params=None, hessian_diag=None, **extra):
        del updates, params, extra
        return hessian_diag, state
    return optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)


def test_sophia_h_equals_optax_contrib_sophia_where_they_agree():
    """Without momentum (b1=0, so optax's bias correction is moot) and with positive
    Hutchinson estimates of a quadratic's Hessian, ours equals optax.contrib.sophia. optax
    uses an estimate from the step after the one it is computed at; ours at once: ours gets
    the estimate one step later, which on a quadratic (constant Hessian) is the same number."""
    k, steps, lr = 4, 30, 0.05
    a = jax.random.normal(jax.random.key(0), (6, 6))
    hessian = a @ a.T / 6 + jnp.diag(jnp.arange(1.0, 7.0))
    loss = lambda p: 0.5 * p["x"] @ hessian @ p["x"]  # noqa: E731
    params = {"x": jax.random.normal(jax.random.key(1), (6,))}
    estimates = [jnp.abs(sophia_estimates.hutchinson(loss, params, jax.random.key(j))["x"]) + 0.1
                 for j in range(steps // k + 1)]
    ours = optim.sophia(lr, b1=0.0, b2=0.9, rho=0.2, eps=1e-20, weight_decay=0.01)
    theirs = optax.contrib.sophia(lr, b1=0.0, b2=0.9, gamma=0.2, eps=1e-20, weight_decay=0.01,
                                  update_interval=k, hessian_diagonal_fn=_passthrough_estimator())
    ours_params, theirs_params = params, params
    ours_state, theirs_state = ours.init(params), theirs.init(params)

    @jax.jit
    def theirs_step(params, state, estimate):
        updates, state = theirs.update(jax.grad(loss)(params), state, params,
                                       hessian_diag=estimate)
        return optax.apply_updates(params, updates), state

    @jax.jit
    def ours_step(params, state, estimate):
        updates, state = ours.update(jax.grad(loss)(params), state, params,
                                     hessian_diag=estimate)
        return optax.apply_updates(params, updates), state

    for t in range(steps):
        theirs_params, theirs_state = theirs_step(theirs_params, theirs_state,
                                                  {"x": estimates[t // k]})
        given = {"x": estimates[(t - 1) // k]} if t % k == 1 else None
        ours_params, ours_state = ours_step(ours_params, ours_state, given)
        np.testing.assert_allclose(ours_params["x"], theirs_params["x"], rtol=1e-5, atol=1e-7,
                                   err_msg=f"step {t}")


def test_hutchinson_is_unbiased_on_a_quadratic():
    a = jax.random.normal(jax.random.key(2), (10, 10))
    hessian = 0.3 * (a + a.T) / 2 + jnp.diag(jnp.arange(1.0, 11.0))  # indefinite off-diagonals
    flat = lambda p: jnp.concatenate([p["u"], p["v"].ravel()])  # noqa: E731
    loss = lambda p: 0.5 * flat(p) @ hessian @ flat(p) + jnp.sum(flat(p))  # noqa: E731
    params = {"u": jnp.ones(4), "v": jnp.ones((2, 3))}
    keys = jax.random.split(jax.random.key(3), 4096)
    draws = jax.jit(jax.vmap(lambda key: flat(sophia_estimates.hutchinson(loss, params, key))))(
        keys)
    np.testing.assert_allclose(draws.mean(axis=0), jnp.diag(hessian), rtol=0.02)
    assert float(draws.std(axis=0).min()) > 0.1  # single draws are noisy: the mean is the test


def test_gnb_equals_the_gauss_newton_diagonal_in_expectation():
    """E[N g^2] over labels sampled from the model = diag of (1/N) sum_i J_i^T H_i J_i, H_i the
    softmax's Hessian diag(p) - p p^T: for a softmax regression, mean_i x_ia^2 p_ic (1 - p_ic)
    for W[a, c] and mean_i p_ic (1 - p_ic) for b[c]."""
    inputs, _, params = _softmax_regression(seed=1)
    params = {"w": params["w"], "b": 0.3 * jnp.arange(C, dtype=jnp.float32)}
    keys = jax.random.split(jax.random.key(4), 32768)
    draws = jax.jit(jax.vmap(lambda key: sophia_estimates.gnb(_logits, params, inputs, key)))(
        keys)
    probs = np.asarray(jax.nn.softmax(_logits(params, inputs)), np.float64)
    x = np.asarray(inputs, np.float64)
    exact_w = (x ** 2).T @ (probs * (1 - probs)) / N
    exact_b = (probs * (1 - probs)).mean(axis=0)
    np.testing.assert_allclose(draws["w"].mean(axis=0), exact_w, rtol=0.03)
    np.testing.assert_allclose(draws["b"].mean(axis=0), exact_b, rtol=0.03)


def test_gnb_gradient_counts_tokens_and_accumulates():
    """The token count is every label position; averaging micro-batch gradients and scaling
    by the total count gives the estimate of the whole batch with the same labels."""
    tokens = jax.random.normal(jax.random.key(5), (2, 6, D))  # [batch, length, features]
    _, _, params = _softmax_regression()
    grads, count = sophia_estimates.gnb_gradient(_logits, params, tokens, jax.random.key(6))
    assert count == 12
    manual = jax.grad(lambda p: -jnp.mean(jnp.take_along_axis(
        jax.nn.log_softmax(_logits(p, tokens)),
        jax.random.categorical(jax.random.key(6), _logits(params, tokens))[..., None], -1)))(params)
    for name in params:
        np.testing.assert_allclose(grads[name], manual[name], rtol=1e-5, atol=1e-7)
    estimate = sophia_estimates.gnb_from_gradient(grads, count)
    np.testing.assert_allclose(estimate["w"], 12 * grads["w"] ** 2, rtol=1e-6)


def test_without_an_estimate_the_step_is_the_sign_of_the_momentum():
    """h = 0 until the first estimate: the step is sign(m) (clipped at 1), as the official
    code before its first Hessian update; and a negative estimate counts as 0."""
    tx = optim.scale_by_sophia()
    params = {"x": jnp.zeros(3)}
    state = tx.init(params)
    grads = {"x": jnp.array([1e-3, -2.0, 0.0])}
    updates, state = tx.update(grads, state, params)
    np.testing.assert_array_equal(updates["x"], [1.0, -1.0, 0.0])
    updates, _ = tx.update(grads, state, params, hessian_diag={"x": -jnp.ones(3)})
    np.testing.assert_array_equal(updates["x"], [1.0, -1.0, 0.0])


def test_extra_args_pass_through_inject_hyperparams():
    tx = optax.inject_hyperparams(optim.sophia, static_args=("hessian_every", "estimator",
                                                              "mask"))(learning_rate=0.1)
    params = {"x": jnp.ones(3)}
    state = tx.init(params)
    grads = {"x": jnp.array([1.0, -1.0, 0.5])}
    big = {"x": jnp.full(3, 1e6)}
    updates, state = jax.jit(tx.update)(grads, state, params, hessian_diag=big)
    # h = 0.01 * 1e6 = 1e4; |m| = 0.035 |g|: ratio 0.035 |g| / (0.04 * 1e4), unclipped.
    expected = -0.1 * (0.035 * np.array([1.0, -1.0, 0.5]) / 400 + 0.1 * 1.0)
    np.testing.assert_allclose(updates["x"], expected, rtol=1e-4)


@pytest.mark.parametrize("kwargs, match", [
    (dict(b1=1.0), "b1"), (dict(b2=-0.5), "b2"), (dict(rho=-1.0), "rho"), (dict(eps=-1.0), "eps"),
    (dict(hessian_every=0), "hessian_every"), (dict(estimator="newton"), "estimator"),
    (dict(weight_decay=-1.0), "weight_decay")])
def test_bad_hyperparameters_name_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        optim.sophia(1e-4, **kwargs)


# optax.contrib.sophia's defaults (ours are the official SophiaG code's), passed explicitly.
OPTAX_DEFAULTS = dict(b2=0.99, eps=1e-8, weight_decay=1e-4)


def _separable_loss(params):
    """sum c x^2 + x^4: a diagonal Hessian 2c + 12 x^2 (~100 to 200 here), which
    Hutchinson's estimate gives exactly whatever its signs, so ours and optax's agree."""
    c = jnp.linspace(50.0, 100.0, params["x"].size).reshape(params["x"].shape)
    return jnp.sum(c * params["x"] ** 2 + params["x"] ** 4)


def test_obj_fn_refreshes_the_hessian_as_optax_contrib_sophia_does():
    """optax's `obj_fn` (Hutchinson's estimate on refresh steps): the Hessian EMA equals
    optax's after every step, and so do the updates except on refresh steps, where ours
    uses the new estimate at once and optax from the next step. b1=0 (optax's bias
    correction moot), optax's other defaults on both. Gradients of about 1e-2 against
    gamma * h of about 1e-2: some coordinates clipped, most not, so h shows."""
    k, lr = 10, 0.1
    ours = optim.sophia(lr, b1=0.0, gamma=0.01, update_interval=k, **OPTAX_DEFAULTS)
    theirs = optax.contrib.sophia(lr, b1=0.0, gamma=0.01, update_interval=k, **OPTAX_DEFAULTS)
    keys = jax.random.split(jax.random.key(0), 50)
    params_seq = [{"x": jax.random.normal(key, (4, 5))} for key in keys[:25]]
    grads_seq = [{"x": 0.01 * jax.random.normal(key, (4, 5))} for key in keys[25:]]
    ours_update = jax.jit(functools.partial(ours.update, obj_fn=_separable_loss))
    theirs_update = jax.jit(functools.partial(theirs.update, obj_fn=_separable_loss))
    without = jax.jit(ours.update)
    ours_state, theirs_state, without_state = (ours.init(params_seq[0]),
                                               theirs.init(params_seq[0]),
                                               ours.init(params_seq[0]))
    unclipped = 0
    for t, (params, grads) in enumerate(zip(params_seq, grads_seq)):
        ours_u, ours_state = ours_update(grads, ours_state, params)
        theirs_u, theirs_state = theirs_update(grads, theirs_state, params)
        without_u, without_state = without(grads, without_state, params)
        np.testing.assert_allclose(ours_state[0].hessian["x"], theirs_state[0].nu["x"],
                                   rtol=1e-5, err_msg=f"step {t}")
        if t % k:
            np.testing.assert_allclose(ours_u["x"], theirs_u["x"], rtol=1e-5, atol=1e-9,
                                       err_msg=f"step {t}")
        unclipped += int(np.sum(np.abs(ours_u["x"] + lr * 1e-4 * params["x"]) < 0.99 * lr))
        assert not np.allclose(ours_u["x"], without_u["x"])  # obj_fn is not dropped
    assert float(jnp.abs(ours_state[0].hessian["x"]).min()) > 1.0
    np.testing.assert_array_equal(without_state[0].hessian["x"], 0.0)
    assert unclipped > 200  # of 500: the estimate shaped most coordinates' steps


def test_obj_fn_is_hutchinsons_estimate_with_the_steps_own_key():
    """On a non-diagonal Hessian (where the probes matter): obj_fn=f is
    hessian_fn=hutchinson(f, params, fold_in(key(seed), step))."""
    a = jax.random.normal(jax.random.key(0), (6, 6))
    loss = lambda p: 0.5 * p["x"] @ (a @ a.T + jnp.eye(6)) @ p["x"]  # noqa: E731
    params = {"x": jax.random.normal(jax.random.key(1), (6,))}
    tx = optim.sophia(0.05, hessian_every=2, seed=3)

    @jax.jit
    def both(params, by_obj_fn, by_hessian_fn, t):
        key = jax.random.fold_in(jax.random.key(3), t)
        grads = jax.grad(loss)(params)
        u1, by_obj_fn = tx.update(grads, by_obj_fn, params, obj_fn=loss)
        u2, by_hessian_fn = tx.update(grads, by_hessian_fn, params, hessian_fn=lambda p: (
            sophia_estimates.hutchinson(loss, p, key)))
        return u1, u2, by_obj_fn, by_hessian_fn

    by_obj_fn, by_hessian_fn = tx.init(params), tx.init(params)
    for t in range(5):
        u1, u2, by_obj_fn, by_hessian_fn = both(params, by_obj_fn, by_hessian_fn, t)
        np.testing.assert_allclose(u1["x"], u2["x"], rtol=1e-6, err_msg=f"step {t}")
        params = optax.apply_updates(params, u1)


def test_optax_names_gamma_and_update_interval_are_rho_and_hessian_every():
    inputs, labels, params = _softmax_regression()
    estimate = lambda p: sophia_estimates.gnb(_logits, p, inputs, jax.random.key(0))  # noqa
    grads_seq = [jax.grad(_loss)(params, inputs, labels)] * 7
    ours = optim.sophia(0.05, rho=0.2, hessian_every=3)
    optax_names = optim.sophia(0.05, gamma=0.2, update_interval=3)
    injected = optax.inject_hyperparams(optim.sophia, static_args=("estimator", "mask"))(
        learning_rate=0.05, gamma=0.2, update_interval=3)
    other = optim.sophia(0.05, rho=0.2, hessian_every=2)
    runs, hessians = [], []
    for tx in (ours, optax_names, injected, other):
        state, updates = tx.init(params), []
        update = jax.jit(functools.partial(tx.update, hessian_fn=estimate))
        for grads in grads_seq:
            u, state = update(grads, state, params)
            updates.append(u)
        runs.append(updates)
        hessians.append(optax.tree.get(state, "hessian"))
    for step in range(7):
        for name in params:
            np.testing.assert_array_equal(runs[1][step][name], runs[0][step][name])
            # Injected, rho is a float32 array where it was a Python float.
            np.testing.assert_allclose(runs[2][step][name], runs[0][step][name], rtol=1e-5)
    np.testing.assert_allclose(hessians[2]["w"], hessians[0]["w"], rtol=1e-5)
    # 3 refreshes in 7 steps (0, 3, 6), not 4 (0, 2, 4, 6): the interval is used.
    b2 = 0.99
    np.testing.assert_allclose(hessians[3]["w"] / hessians[0]["w"],
                               (1 - b2 ** 4) / (1 - b2 ** 3), rtol=1e-4)
    with pytest.raises(ValueError, match="rho or gamma"):
        optim.sophia(0.05, rho=0.1, gamma=0.2)
    with pytest.raises(ValueError, match="hessian_every or update_interval"):
        optim.sophia(0.05, hessian_every=5, update_interval=3)


def test_an_unknown_argument_meant_for_sophia_raises_and_others_pass_through():
    tx = optim.sophia(0.1)
    params = {"x": jnp.ones(3)}
    grads = {"x": jnp.array([1.0, -1.0, 0.5])}
    state = tx.init(params)
    for name, meant in [("hessian_dig", "hessian_diag"), ("loss_fn", "obj_fn"),
                        ("hessian", "hessian_fn"), ("hess_estimate", None)]:
        match = rf"unexpected keyword argument '{name}'" + (
            rf" \(did you mean '{meant}'\?\)" if meant else "")
        with pytest.raises(TypeError, match=match):
            tx.update(grads, state, params, **{name: {"x": jnp.ones(3)}})
    with pytest.raises(ValueError, match=r"one of \['hessian_diag', 'hessian_fn', 'obj_fn'\]"):
        tx.update(grads, state, params, hessian_diag=params, obj_fn=lambda p: 0.0)
    # An optax chain hands every extra argument to each transform: others pass through.
    plain, _ = tx.update(grads, state, params)
    extra, _ = tx.update(grads, state, params, value=jnp.array(1.0))
    np.testing.assert_array_equal(extra["x"], plain["x"])
