"""The optimizers of issue 33 against their references.

AdEMAMix and ADOPT against optax.contrib (float32, rtol 1e-5, 100 steps); MARS, cautious
updates and AdamSAGE against float64 numpy transcriptions of the authors' code, written here
from reading it; Kron against psgd_jax's own numbers (tests/data/kron_reference.npz, made by
tests/data/kron_reference.py). Then validation, inject_hyperparams, a traced and vmapped
learning rate, bf16 and sharded state for all of them."""
import doctest
import importlib
import json
import math
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from ravine import optim
from ravine.optim.adamsage import adamsage, scale_by_adamsage
from ravine.optim.ademamix import ademamix, alpha_schedule, b3_schedule
from ravine.optim.adopt import adopt
from ravine.optim.cautious import cautious
from ravine.optim.kron import kron
from ravine.optim.mars import mars
from tests.oracle import MIXED_SHAPES, assert_same_updates, random_tree, run_updates

LR = 0.01
MASK_TREE = {"scalar": False, "bias": False, "dense": True, "conv": True}
SCHEDULE = optax.warmup_cosine_decay_schedule(0.0, 0.05, warmup_steps=10, decay_steps=100)


# --- AdEMAMix and ADOPT: equal to optax.contrib (float32, rtol 1e-5, 100 steps) ---

def _adopt_then_decay(learning_rate, weight_decay, mask, **kwargs):
    """optax's ADOPT direction, then decoupled decay, then the learning rate."""
    return optax.chain(optax.contrib.scale_by_adopt(**kwargs),
                       optax.add_decayed_weights(weight_decay, mask),
                       optax.scale_by_learning_rate(learning_rate))


EQUAL_TO_OPTAX = {
    "ademamix": (lambda: ademamix(LR), lambda: optax.contrib.ademamix(LR)),
    "ademamix_args_decay": (
        lambda: ademamix(LR, b1=0.8, b2=0.99, b3=0.999, alpha=8.0, eps=1e-6, eps_root=1e-8,
                         weight_decay=0.1, mask=MASK_TREE),
        lambda: optax.contrib.ademamix(LR, b1=0.8, b2=0.99, b3=0.999, alpha=8.0, eps=1e-6,
                                       eps_root=1e-8, weight_decay=0.1, mask=MASK_TREE)),
    # The paper's warmups of alpha and b3 as schedules, and a learning-rate schedule.
    "ademamix_schedules": (
        lambda: ademamix(SCHEDULE, alpha=alpha_schedule(5.0, 50),
                         b3=b3_schedule(0.9, 0.999, 50), weight_decay=0.05,
                         mask=optim.decay_mask),
        lambda: optax.contrib.ademamix(SCHEDULE, alpha=alpha_schedule(5.0, 50),
                                       b3=b3_schedule(0.9, 0.999, 50), weight_decay=0.05,
                                       mask=optim.decay_mask)),
    "adopt": (lambda: adopt(LR), lambda: optax.contrib.adopt(LR)),
    "adopt_nesterov_no_clipping": (
        lambda: adopt(LR, b1=0.8, b2=0.99, eps=1e-5, nesterov=True, use_clipping=False),
        lambda: optax.contrib.adopt(LR, b1=0.8, b2=0.99, eps=1e-5, nesterov=True,
                                    use_clipping=False)),
    "adopt_schedule_clip_fn_decay": (
        lambda: adopt(SCHEDULE, nesterov=True, clip_value_fn=lambda t: 0.5 * t ** 0.5,
                      weight_decay=0.1, mask=optim.decay_mask),
        lambda: _adopt_then_decay(SCHEDULE, 0.1, optim.decay_mask, nesterov=True,
                                  clip_value_fn=lambda t: 0.5 * t ** 0.5)),
}  # (inject_hyperparams: see test_inject_hyperparams_and_traced_lr_under_vmap)


@pytest.mark.parametrize("case", sorted(EQUAL_TO_OPTAX))
def test_equals_optax(case):
    ours, theirs = EQUAL_TO_OPTAX[case]
    assert_same_updates(ours(), theirs(), steps=100)


def test_ademamix_warmup_schedules_reach_their_ends():
    alpha, b3 = alpha_schedule(5.0, 100), b3_schedule(0.9, 0.9999, 100)
    np.testing.assert_allclose([alpha(0), alpha(50), alpha(100), alpha(500)],
                               [0.0, 2.5, 5.0, 5.0], rtol=1e-6)
    np.testing.assert_allclose([b3(0), b3(100), b3(500)], [0.9, 0.9999, 0.9999], rtol=1e-6)
    # The EMA's time scale -1/ln(b3_t) grows linearly from b1's to b3's.
    times = [-1 / math.log(float(b3(t))) for t in (0, 50, 100)]
    assert times[1] == pytest.approx((times[0] + times[2]) / 2, rel=1e-3)


# --- random gradients for the transcription tests ---

def _grads_with_varying_scale(steps, seed=1, shapes=None):
    """Random gradients whose size changes from step to step (log-uniform in [0.01, 1]), so
    MARS's gradient differences are large and its clipping is sometimes on, sometimes off."""
    rng = np.random.default_rng(seed)
    shapes = MIXED_SHAPES if shapes is None else shapes
    scales = np.exp(rng.uniform(np.log(0.01), 0.0, size=steps))
    return [{name: np.asarray(s * rng.standard_normal(shape), np.float32)
             for name, shape in sorted(shapes.items())} for s in scales]


def _assert_updates_close(ours, reference, rtol=1e-5, atol=1e-8):
    for t, (a, b) in enumerate(zip(ours, reference)):
        for name in b:
            np.testing.assert_allclose(np.asarray(a[name], np.float64), b[name], rtol=rtol,
                                       atol=atol, err_msg=f"step {t}, leaf {name}")


def _initial_params(seed=0, shapes=None):
    return random_tree(jax.random.key(seed), shapes)


def _f64(tree):
    return {name: np.asarray(value, np.float64) for name, value in tree.items()}


# --- MARS: a float64 numpy transcription of the official update ---

def mars_reference(params, grads_seq, lr, betas=(0.95, 0.99), eps=1e-8, weight_decay=0.0,
                   gamma=0.025, optimize=lambda shape: len(shape) == 2, lr_1d=None,
                   betas_1d=(0.9, 0.95), weight_decay_1d=0.1, decayed=lambda name: True,
                   clip_log=None):
    """AGI-Arena/MARS `MARS(mars_type="mars-adamw", is_approx=True, amsgrad=False).step`,
    per tensor, in float64; returns the update (new p - old p) of every step.

    `optimize(shape)` is its `optimize_1d or is_grad_2d` routing test (the official:
    `len(shape) == 2`); `decayed(name)` False puts a leaf in a weight-decay-free group (for
    the official code, only the MARS branch's `weight_decay` follows the group: its 1-D branch
    always takes `weight_decay_1d`; we zero that too, as ravine's `mask` does).
    """
    lr_1d_factor = (lr if lr_1d is None else lr_1d) / lr
    p = _f64(params)
    state = {name: dict(step=0, exp_avg=np.zeros_like(v), exp_avg_sq=np.zeros_like(v),
                        last_grad=np.zeros_like(v)) for name, v in p.items()}
    out = []
    for grads in grads_seq:
        step_updates = {}
        for name in sorted(p):
            grad = np.asarray(grads[name], np.float64)
            s = state[name]
            s["step"] += 1
            step = s["step"]
            if optimize(grad.shape):
                beta1, beta2 = betas
                wd = weight_decay if decayed(name) else 0.0
                c_t = (grad - s["last_grad"]) * (gamma * (beta1 / (1.0 - beta1))) + grad
                c_t_norm = np.sqrt(np.sum(c_t * c_t))
                if clip_log is not None:
                    clip_log.append(c_t_norm > 1.0)
                if c_t_norm > 1.0:
                    c_t = c_t / c_t_norm
                s["exp_avg"] = beta1 * s["exp_avg"] + (1.0 - beta1) * c_t
                s["exp_avg_sq"] = beta2 * s["exp_avg_sq"] + (1.0 - beta2) * c_t * c_t
                bias_correction1 = 1.0 - beta1 ** step
                bias_correction2 = 1.0 - beta2 ** step
                denom = (np.sqrt(s["exp_avg_sq"]) * (1 / math.sqrt(bias_correction2))
                         + eps) * bias_correction1
                update = -lr * (p[name] * wd + s["exp_avg"] / denom)
            else:
                beta1_1d, beta2_1d = betas_1d
                wd_1d = weight_decay_1d if decayed(name) else 0.0
                s["exp_avg"] = beta1_1d * s["exp_avg"] + (1.0 - beta1_1d) * grad
                s["exp_avg_sq"] = beta2_1d * s["exp_avg_sq"] + (1.0 - beta2_1d) * grad * grad
                bias_correction1 = 1.0 - beta1_1d ** step
                bias_correction2 = 1.0 - beta2_1d ** step
                denom = (np.sqrt(s["exp_avg_sq"]) * (1 / math.sqrt(bias_correction2))
                         + eps) * bias_correction1
                update = -lr * lr_1d_factor * (p[name] * wd_1d + s["exp_avg"] / denom)
            p[name] = p[name] + update
            s["last_grad"] = grad  # is_approx: the raw gradient, not c_t
            step_updates[name] = update
        out.append(step_updates)
    return out


def _ndim_is_2(params):
    return jax.tree.map(lambda x: x.ndim == 2, params)


def test_mars_equals_the_official_update_at_its_defaults():
    """Defaults: MARS on ndim >= 2 (dense, conv), AdamW (0.9, 0.95, wd 0.1) on the rest."""
    params, grads = _initial_params(), _grads_with_varying_scale(20)
    clip_log = []
    reference = mars_reference(params, grads, LR, optimize=lambda shape: len(shape) >= 2,
                               clip_log=clip_log)
    assert any(clip_log) and not all(clip_log)  # both sides of the clipping were exercised
    _assert_updates_close(run_updates(mars(LR), params, grads), reference)


def test_mars_equals_the_official_update_with_its_routing_and_arguments():
    """The official exact-2-D routing, weight decay, other betas/gamma and a separate AdamW lr;
    a mask keeps the scalar and the bias undecayed."""
    params, grads = _initial_params(), _grads_with_varying_scale(20, seed=2)
    ours = mars(LR, b1=0.9, b2=0.95, eps=1e-6, gamma=0.05, weight_decay=0.1, mask=MASK_TREE,
                mars_mask=_ndim_is_2, adam_learning_rate=0.003, adam_b1=0.8, adam_b2=0.9,
                adam_weight_decay=0.2)
    reference = mars_reference(params, grads, LR, betas=(0.9, 0.95), eps=1e-6,
                               weight_decay=0.1, gamma=0.05, lr_1d=0.003,
                               betas_1d=(0.8, 0.9), weight_decay_1d=0.2,
                               decayed=lambda name: MASK_TREE[name])
    _assert_updates_close(run_updates(ours, params, grads), reference)


def test_mars_first_step_and_independent_decay():
    """Step 0 sees c = (1 + gamma b1 / (1 - b1)) g (last gradient 0): with gamma = 0 and no
    clipping the first update is Adam's, lr * sign(g). And "independent" weight decay is
    lr-scaled decay divided by the peak lr, on both routes."""
    params = _initial_params()
    grads = _grads_with_varying_scale(3, seed=3)
    first = run_updates(mars(LR, gamma=0.0, max_norm=None, adam_weight_decay=0.0), params,
                        grads[:1])[0]
    for name in params:
        g = np.asarray(grads[0][name], np.float64)
        np.testing.assert_allclose(first[name], -LR * g / (np.abs(g) + 1e-8), rtol=1e-5)
    independent = mars(LR, weight_decay=0.1, adam_weight_decay=0.2,
                       weight_decay_mode="independent")
    lr_scaled = mars(LR, weight_decay=0.1 / LR, adam_weight_decay=0.2 / LR)
    _assert_updates_close(run_updates(independent, params, grads),
                          [_f64(u) for u in run_updates(lr_scaled, params, grads)],
                          rtol=1e-6, atol=0)


# --- Cautious updates: numpy transcriptions of the rule on AdamW and Lion, and of C-AdamW ---

def _cautious_mask(u, g, descent_sign=-1.0, eps=1e-3):
    """The official per-tensor mask (`mask.div_(mask.mean().clamp_(min=1e-3))`); `u * g`
    must have `descent_sign`'s sign (-1 for a step that is added, +1 for a direction)."""
    phi = (descent_sign * u * g > 0).astype(np.float64)
    return phi / max(phi.mean(), eps)


def adamw_lion_cautious_reference(params, grads_seq, kind, lr, weight_decay, decayed,
                                  b1, b2, eps=1e-8):
    """The cautious rule applied to the whole step of AdamW (optax's: m^ / (sqrt(v^) + eps))
    or Lion (optax's), decay included, float64."""
    p = _f64(params)
    m = {name: np.zeros_like(v) for name, v in p.items()}
    v = {name: np.zeros_like(x) for name, x in p.items()}
    out = []
    for t, grads in enumerate(grads_seq, start=1):
        step_updates = {}
        for name in sorted(p):
            g = np.asarray(grads[name], np.float64)
            wd = weight_decay if decayed[name] else 0.0
            if kind == "adamw":
                m[name] = b1 * m[name] + (1 - b1) * g
                v[name] = b2 * v[name] + (1 - b2) * g * g
                direction = (m[name] / (1 - b1 ** t)) / (np.sqrt(v[name] / (1 - b2 ** t)) + eps)
            else:
                direction = np.sign(b1 * m[name] + (1 - b1) * g)
                m[name] = b2 * m[name] + (1 - b2) * g
            u = -lr * (direction + wd * p[name])
            u = u * _cautious_mask(u, g)
            p[name] = p[name] + u
            step_updates[name] = u
        out.append(step_updates)
    return out


def c_adamw_reference(params, grads_seq, lr, weight_decay, b1=0.9, b2=0.999, eps=1e-8,
                      decayed=None, eps_placement="pytorch"):
    """kyleliang919/C-Optim `c_adamw.AdamW.step` (single tensor, correct_bias=True), float64:
    decay first, then the masked Adam step with the mask from `exp_avg * grad > 0`.

    `decayed[name]` False: that leaf is in a group without decay. `eps_placement="optax"`:
    the paper's Algorithm 2 writes `u = m^ / (sqrt(v^) + eps)` (eps after the bias
    correction, optax's and `optim.adamw`'s) where the code adds eps to `sqrt(v)` before it."""
    p = _f64(params)
    m = {name: np.zeros_like(v) for name, v in p.items()}
    v = {name: np.zeros_like(x) for name, x in p.items()}
    out = []
    for step, grads in enumerate(grads_seq, start=1):
        step_updates = {}
        for name in sorted(p):
            grad = np.asarray(grads[name], np.float64)
            wd = weight_decay if decayed is None or decayed[name] else 0.0
            old = p[name]
            new = old + old * (-lr * wd)
            m[name] = m[name] * b1 + grad * (1.0 - b1)
            v[name] = v[name] * b2 + grad * grad * (1.0 - b2)
            if eps_placement == "pytorch":
                denom = np.sqrt(v[name]) + eps
                step_size = lr * math.sqrt(1.0 - b2 ** step) / (1.0 - b1 ** step)
            else:
                denom = np.sqrt(v[name] / (1.0 - b2 ** step)) + eps
                step_size = lr / (1.0 - b1 ** step)
            mask = _cautious_mask(m[name], grad, descent_sign=+1.0)
            new = new - step_size * (m[name] * mask) / denom
            p[name] = new
            step_updates[name] = new - old
        out.append(step_updates)
    return out


def test_cautious_adamw_and_lion_equal_the_rule():
    params, grads = _initial_params(), _grads_with_varying_scale(20, seed=4)
    cases = [
        (cautious(optim.adamw(LR, b1=0.9, b2=0.99, weight_decay=0.1, mask=MASK_TREE)),
         adamw_lion_cautious_reference(params, grads, "adamw", LR, 0.1, MASK_TREE, 0.9, 0.99)),
        (cautious(optim.lion(LR, b1=0.9, b2=0.99, weight_decay=0.1)),
         adamw_lion_cautious_reference(params, grads, "lion", LR, 0.1,
                                       {name: True for name in params}, 0.9, 0.99)),
    ]
    for tx, reference in cases:
        _assert_updates_close(run_updates(tx, params, grads), reference)  # run_updates jits


def test_cautious_on_the_direction_is_official_c_adamw():
    params, grads = _initial_params(), _grads_with_varying_scale(20, seed=5)
    # C-AdamW adds eps to sqrt(v) before the bias correction (PyTorch's AdamW), optax after
    # (eps / sqrt(1 - b2^t) apart): with eps = 1e-12 the two placements agree to ~1e-9.
    ours = optax.chain(cautious(optim.scale_by_adam(eps=1e-12), direction=True),
                       optim.decay_and_scale(LR, weight_decay=0.1))
    # float32's 1 - b2^t loses digits early (1 - 0.999^2 = 0.002): 5e-5, not 1e-5 (and
    # 1e-5 of lr absolute where the decay and Adam's step nearly cancel).
    _assert_updates_close(run_updates(ours, params, grads),
                          c_adamw_reference(params, grads, LR, 0.1, eps=1e-12), rtol=5e-5,
                          atol=1e-5 * LR)


def test_registered_cautious_adamw_is_c_adamw():
    """`optim.create("cautious_adamw")` is the paper's C-AdamW: Adam's direction masked,
    decoupled decay outside the mask (per-leaf decay mask kept), equal to the float64
    transcription at optax's eps placement and default eps; to the official code at eps
    1e-12 (as above); and to `cautious(optim.adamw(...))` without decay, which it differs
    from with decay (there the wrapper masks the decay too)."""
    params, grads = _initial_params(), _grads_with_varying_scale(20, seed=6)
    hparams = dict(learning_rate=LR, b1=0.9, b2=0.99, weight_decay=0.1, mask=MASK_TREE)
    ours = run_updates(optim.create("cautious_adamw", **hparams), params, grads)
    _assert_updates_close(ours, c_adamw_reference(params, grads, LR, 0.1, b2=0.99,
                                                  decayed=MASK_TREE, eps_placement="optax"),
                          rtol=5e-5, atol=1e-5 * LR)  # float32's 1 - b2^t, as above
    official = run_updates(optim.create("cautious_adamw", learning_rate=LR, eps=1e-12,
                                        weight_decay=0.1), params, grads)
    _assert_updates_close(official, c_adamw_reference(params, grads, LR, 0.1, eps=1e-12),
                          rtol=5e-5, atol=1e-5 * LR)
    no_decay = dict(hparams, weight_decay=0.0)
    _assert_updates_close(
        run_updates(optim.create("cautious_adamw", **no_decay), params, grads),
        [_f64(u) for u in run_updates(cautious(optim.adamw(**no_decay)), params, grads)],
        rtol=1e-6, atol=0)
    whole_step = run_updates(cautious(optim.adamw(**hparams)), params, grads)
    assert max(np.max(np.abs(np.asarray(a["dense"]) - np.asarray(b["dense"])))
               for a, b in zip(ours, whole_step)) > 1e-4 * LR
    assert optim.spec("cautious_adamw").centre_lr == optim.spec("adamw").centre_lr


def test_cautious_mask_by_hand_and_wrapper_plumbing():
    """Disagreeing and zero-gradient coordinates are dropped, the rest scaled by 1/mean; the
    kept fraction is floored at eps; the inner state and extra arguments pass through."""
    g = {"w": jnp.array([1.0, -2.0, 0.0, 3.0])}
    sgd = optax.sgd(1.0)  # u = -g: every coordinate with g != 0 descends
    flipped = optax.chain(optax.sgd(1.0), optax.scale(jnp.array([1.0, -1.0, 1.0, 1.0])))
    u, _ = cautious(sgd).update(g, cautious(sgd).init(g))
    np.testing.assert_allclose(u["w"], np.array([-1.0, 2.0, 0.0, -3.0]) / 0.75)
    u, _ = cautious(flipped).update(g, flipped.init(g))  # coordinate 1 now goes uphill
    np.testing.assert_allclose(u["w"], np.array([-1.0, 0.0, 0.0, -3.0]) / 0.5)
    u, _ = cautious(sgd, eps=0.9).update(g, sgd.init(g))
    np.testing.assert_allclose(u["w"], np.array([-1.0, 2.0, 0.0, -3.0]) / 0.9)

    class ExtraState(NamedTuple):
        count: jax.Array

    def init_fn(params):
        return ExtraState(jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None, *, scale):
        return jax.tree.map(lambda x: -scale * x, updates), ExtraState(state.count + 1)

    inner = optax.GradientTransformationExtraArgs(init_fn, update_fn)
    wrapped = cautious(inner)
    state = wrapped.init(g)
    assert isinstance(state, ExtraState)
    u, state = jax.jit(lambda g, s: wrapped.update(g, s, None, scale=2.0))(g, state)
    np.testing.assert_allclose(u["w"], np.array([-2.0, 4.0, 0.0, -6.0]) / 0.75)
    assert int(state.count) == 1


# --- AdamSAGE: a float64 numpy transcription of the authors' AdamW-SAGE ---

def adamsage_reference(params, grads_seq, lr, b1=0.9, b2=0.999, b3=0.75, eps=1e-6,
                       weight_decay=0.0, correct_bias=True, sage=lambda name: True):
    """cliang1453/SAGE `UnstructAwareAdamW.step` (t_total=-1: constant lr; max_grad_norm=-1:
    no per-tensor clipping), float64. Groups with `sage(name)` are its "mask" groups (the
    sensitivity-scaled step), the others its "common" groups (AdamW). Weight decay is
    ravine's decoupled `-lr * wd * p_old` (the code multiplies the new p by 1 - lr * wd)."""
    p = _f64(params)
    state = {name: dict(step=0, exp_avg=np.zeros_like(v), exp_avg_sq=np.zeros_like(v),
                        exp_avg_ipt=np.zeros_like(v)) for name, v in p.items()}
    out = []
    for grads in grads_seq:
        step_updates = {}
        for name in sorted(p):
            grad = np.asarray(grads[name], np.float64)
            s = state[name]
            s["step"] += 1
            s["exp_avg"] = s["exp_avg"] * b1 + grad * (1.0 - b1)
            s["exp_avg_sq"] = s["exp_avg_sq"] * b2 + grad * grad * (1.0 - b2)
            denom = np.sqrt(s["exp_avg_sq"]) + eps
            step_size = lr
            if sage(name):
                ipt = np.abs(p[name] * grad)
                s["exp_avg_ipt"] = s["exp_avg_ipt"] * b3 + ipt * (1.0 - b3)
                if correct_bias:
                    bias_correction1 = 1.0 - b1 ** s["step"]
                    bias_correction2 = 1.0 - b2 ** s["step"]
                    bias_correction3 = 1.0 - b3 ** s["step"]
                    ipt_hat = s["exp_avg_ipt"] / bias_correction3
                    step_size = step_size * np.abs(ipt - ipt_hat) / (ipt_hat + eps ** 2)
                    step_size = step_size * math.sqrt(bias_correction2) / bias_correction1
                else:
                    step_size = step_size * (np.abs(ipt - s["exp_avg_ipt"])
                                             / (s["exp_avg_ipt"] + eps ** 2))
            elif correct_bias:
                step_size = step_size * (math.sqrt(1.0 - b2 ** s["step"])
                                         / (1.0 - b1 ** s["step"]))
            update = -(s["exp_avg"] / denom * step_size) - lr * weight_decay * p[name]
            p[name] = p[name] + update
            step_updates[name] = update
        out.append(step_updates)
    return out


@pytest.mark.parametrize("kwargs", [
    {},
    dict(b1=0.8, b2=0.99, b3=0.85, eps=1e-5, weight_decay=0.1, sage_mask=MASK_TREE),
    dict(b3=0.6, correct_bias=False, sage_mask=optim.decay_mask),
], ids=["defaults", "args_decay_mask_tree", "no_bias_correction"])
def test_adamsage_equals_the_authors_update(kwargs):
    params, grads = _initial_params(), _grads_with_varying_scale(20, seed=6)
    sage_mask = kwargs.get("sage_mask")
    flags = optim.decay_mask(params) if callable(sage_mask) else sage_mask
    ref_kwargs = {k: v for k, v in kwargs.items() if k != "sage_mask"}
    reference = adamsage_reference(
        params, grads, LR, sage=(lambda name: True) if flags is None else flags.__getitem__,
        **ref_kwargs)
    # U = |I - I_hat| is a difference of close numbers: float32 rounding of I (~1e-7 of it)
    # shows up in the update at about lr * 1e-6 absolute.
    _assert_updates_close(run_updates(adamsage(LR, **kwargs), params, grads), reference,
                          rtol=1e-4, atol=1e-7)


def test_adamsage_needs_noise_and_params():
    """First step ~0 (I_hat = I); a fixed gradient at fixed params never moves it; without
    params it raises."""
    params = _initial_params()
    grads = _grads_with_varying_scale(1, seed=7)[0]
    tx = adamsage(LR)
    state, step = tx.init(params), jax.jit(tx.update)
    for _ in range(3):
        updates, state = step(grads, state, params)
        for name in params:
            assert np.max(np.abs(updates[name])) < 1e-5 * LR
    # Leaves left out by sage_mask keep a 0-d placeholder instead of a sensitivity EMA.
    placeholders = scale_by_adamsage(sage_mask=MASK_TREE).init(params).sensitivity
    assert {name: leaf.shape for name, leaf in placeholders.items()} == {
        name: MIXED_SHAPES[name] if MASK_TREE[name] else () for name in MIXED_SHAPES}
    with pytest.raises(ValueError, match="params"):
        scale_by_adamsage().update(grads, state[0], None)


# --- Kron: equal to psgd_jax's kron, run by tests/data/kron_reference.py ---

KRON_DATA = os.path.join(os.path.dirname(__file__), "data", "kron_reference.npz")


def _kron_reference():
    data = np.load(KRON_DATA)
    names = sorted(key.split("/")[1] for key in data.files if key.startswith("params/"))
    return data, names, json.loads(str(data["configs"]))


@pytest.mark.parametrize("config", ["defaults", "options"])
def test_kron_equals_psgd_jax(config):
    """Every step's update of psgd_jax 0.2.9's `kron` (same seed, same probes and balancing
    draws), and the factors after the last step, within float32 rounding."""
    data, names, configs = _kron_reference()
    steps, kwargs = configs[config]["steps"], dict(configs[config]["kwargs"])
    if "weight_decay_mask" in kwargs:
        kwargs["mask"] = kwargs.pop("weight_decay_mask")
    tx = kron(configs[config]["learning_rate"], **kwargs)
    params = {name: jnp.asarray(data[f"params/{name}"]) for name in names}
    grads = [{name: data[f"grads/{name}"][t] for name in names} for t in range(steps)]
    reference = [{name: data[f"{config}/{name}"][t].astype(np.float64) for name in names}
                 for t in range(steps)]
    state, step = tx.init(params), jax.jit(tx.update)
    ours = []
    for g in grads:
        updates, state = step(g, state, params)
        params = optax.apply_updates(params, updates)
        ours.append(updates)
    # Updates are ~lr in size (RMS <= 1.1 lr): 1e-5 of lr absolute, 1e-5 relative.
    _assert_updates_close(ours, reference, rtol=1e-5, atol=1e-5 * LR)
    for name in names:  # the factors sit in a tree like the params
        factors = state[0].preconditioners[name]
        for i, factor in enumerate(factors):
            np.testing.assert_allclose(factor, data[f"{config}/factors/{name}/{i}"],
                                       rtol=1e-4, atol=1e-6, err_msg=f"{name} factor {i}")


def test_kron_layout_and_balancing():
    """Which dims get triangular factors, and balancing keeps the product."""
    params = {"w": jnp.zeros((6, 5)), "v": jnp.zeros(4), "s": jnp.zeros(()),
              "big": jnp.zeros((3, 10)), "one": jnp.zeros((1, 3))}
    factors = kron(LR, max_size_triangular=8).init(params)[0].preconditioners
    shapes = {name: [f.shape for f in fs] for name, fs in factors.items()}
    assert shapes == {"big": [(3, 3), (10,)], "one": [(1,), (3, 3)], "s": [()], "v": [(4,)],
                      "w": [(6, 6), (5, 5)]}
    one_diag = kron(LR, memory_save_mode="one_diag").init({"w": jnp.zeros((5, 5))})
    assert [f.shape for f in one_diag[0].preconditioners["w"]] == [(5, 5), (5,)]
    # The momentum follows the params' dtype and sharding; the factors are float32.
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    sharding = NamedSharding(mesh, P("data", "model"))
    w = jax.device_put(jnp.zeros((8, 6), jnp.bfloat16), sharding)
    state = kron(LR).init({"w": w})[0]
    assert state.mu["w"].dtype == jnp.bfloat16
    assert state.mu["w"].sharding.is_equivalent_to(sharding, 2)
    assert {f.dtype for f in state.preconditioners["w"]} == {jnp.dtype(jnp.float32)}
    from ravine.optim.kron import _balance
    q1, q2 = jnp.eye(2) * 4.0, jnp.ones(3) * 0.25
    b1, b2 = _balance((q1, q2))
    np.testing.assert_allclose([jnp.max(b1), jnp.max(b2)], [1.0, 1.0])
    np.testing.assert_allclose(jnp.kron(b1, jnp.diag(b2)), jnp.kron(q1, jnp.diag(q2)))


# --- Shared properties: validation, inject_hyperparams, traced lr under vmap, dtypes, shardings

FACTORIES = {
    "ademamix": ademamix,
    "adopt": adopt,
    "mars": mars,
    "adamsage": adamsage,
    "cautious_wrapper": lambda learning_rate, **kw: cautious(optim.adamw(learning_rate, **kw)),
    "cautious_adamw": optim.cautious_adamw,
    "kron": kron,
}
# Arguments that shape the optimizer: static under inject_hyperparams.
STATIC_ARGS = {"kron": ("max_size_triangular", "min_ndim_triangular")}


@pytest.mark.parametrize("factory, kwargs, match", [
    (ademamix, dict(b3=1.0), "b3"), (ademamix, dict(alpha=-1.0), "alpha"),
    (ademamix, dict(learning_rate=-1.0), "learning_rate"),
    (ademamix, dict(weight_decay_mode="l2"), "weight_decay_mode"),
    (adopt, dict(b2=1.5), "b2"), (adopt, dict(eps=-1.0), "eps"),
    (adopt, dict(clip_value_fn=3.0), "clip_value_fn"),
    (adopt, dict(weight_decay=-0.1), "weight_decay"),
    (mars, dict(gamma=-0.1), "gamma"), (mars, dict(max_norm=0.0), "max_norm"),
    (mars, dict(adam_b1=1.0), "adam_b1"), (mars, dict(adam_weight_decay=-1.0),
                                           "adam_weight_decay"),
    (mars, dict(adam_learning_rate=-1.0), "adam_learning_rate"),
    (mars, dict(weight_decay_mode="independent", learning_rate=jnp.array(0.1)),
     "learning_rate"),
    (adamsage, dict(b3=1.0), "b3"), (adamsage, dict(eps=-1.0), "eps"),
    (adamsage, dict(b1=-0.1), "b1"),
    (lambda learning_rate, **kw: cautious(optim.adamw(learning_rate), **kw), dict(eps=0.0),
     "eps"),
    (lambda learning_rate, **kw: cautious(learning_rate), {}, "tx"),
    (optim.cautious_adamw, dict(cautious_eps=0.0), "cautious_eps"),
    (optim.cautious_adamw, dict(b2=1.0), "b2"),
    (optim.cautious_adamw, dict(weight_decay_mode="l2"), "weight_decay_mode"),
    (kron, dict(b1=1.0), "b1"), (kron, dict(memory_save_mode="some_diag"), "memory_save_mode"),
    (kron, dict(preconditioner_update_probability=1.5), "preconditioner_update_probability"),
    (kron, dict(preconditioner_lr=0.0), "preconditioner_lr"),
    (kron, dict(max_size_triangular=0), "max_size_triangular"),
    (kron, dict(precond_update_precision="float16"), "precond_update_precision"),
])
def test_bad_hyperparameters_name_the_value(factory, kwargs, match):
    kwargs = {"learning_rate": LR, **kwargs}
    with pytest.raises(ValueError, match=match):
        factory(**kwargs)


def _params_after(tx, params, grads_seq):
    state = tx.init(params)
    for grads in grads_seq:
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
    return params


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_inject_hyperparams_and_traced_lr_under_vmap(name):
    """The learning rate as a traced array vmapped over [0, lr] (as the race's vmapped sweep
    runs it) equals no move and the run with every numeric argument an array (as
    `optax.inject_hyperparams` passes them)."""
    factory = FACTORIES[name]
    # Kron's program is large (probes, triangular solves, a cond): one matrix, one step.
    # (Two steps for the others: ADOPT's first step is 0.)
    shapes, steps = ({"dense": (6, 5)}, 1) if name == "kron" else (None, 2)
    params = _initial_params(shapes=shapes)
    grads = _grads_with_varying_scale(steps, seed=8, shapes=shapes)
    batched = jax.jit(jax.vmap(lambda lr: _params_after(factory(lr), params, grads)))(
        jnp.array([0.0, LR]))
    if name == "cautious_wrapper":  # a wrapper: inject the optimizer it wraps
        injected_tx = cautious(optax.inject_hyperparams(optim.adamw)(learning_rate=LR))
    else:
        injected_tx = optax.inject_hyperparams(factory, static_args=STATIC_ARGS.get(name, ()))(
            learning_rate=LR)
    injected = jax.jit(lambda: _params_after(injected_tx, params, grads))()
    for leaf in params:
        np.testing.assert_array_equal(batched[leaf][0], params[leaf])
        assert np.max(np.abs(injected[leaf] - params[leaf])) > 0, leaf
        # params of size ~1 after float32 steps: a few ulp (1.2e-7) absolute.
        np.testing.assert_allclose(batched[leaf][1], injected[leaf], rtol=1e-5, atol=5e-7)


SHARDED_SPECS = {"scalar": P(), "bias": P("model"), "dense": P("data", "model"),
                 "conv": P(None, None, "data", "model")}
SHARDED_SHAPES = {"scalar": (), "bias": (8,), "dense": (16, 8), "conv": (3, 3, 4, 8)}


# cautious(tx) has tx's state; kron's is checked below
@pytest.mark.parametrize("name", ["ademamix", "adopt", "mars", "adamsage", "cautious_adamw"])
def test_bf16_state_and_sharded_state_follow_the_params(name):
    """bf16 params keep bf16 updates and state (the state's dtypes never change, so jit
    does not re-trace for them); on a 4x2 mesh every param-shaped state leaf has its param's
    sharding."""
    tx = FACTORIES[name](LR)
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    shardings = {k: NamedSharding(mesh, spec) for k, spec in SHARDED_SPECS.items()}
    grads = [jax.device_put(jax.tree.map(lambda x: x.astype(jnp.bfloat16), g), shardings)
             for g in _grads_with_varying_scale(2, seed=9, shapes=SHARDED_SHAPES)]
    params = jax.device_put(jax.tree.map(lambda x: x.astype(jnp.bfloat16),
                                         _initial_params(shapes=SHARDED_SHAPES)), shardings)

    @jax.jit
    def train_step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, updates

    state = tx.init(params)
    dtypes = jax.tree.map(lambda x: x.dtype, state)
    for g in grads:
        params, state, updates = train_step(params, state, g)
    assert jax.tree.map(lambda x: x.dtype, state) == dtypes
    floats = {leaf.dtype for leaf in jax.tree.leaves((updates, state))
              if jnp.issubdtype(leaf.dtype, jnp.floating)}
    assert floats == {jnp.dtype(jnp.bfloat16)}, floats
    checked = 0
    for path, leaf in jax.tree_util.tree_leaves_with_path(state):
        param_name = getattr(path[-1], "key", None)
        if param_name in shardings and leaf.shape == SHARDED_SHAPES[param_name]:
            assert leaf.sharding.is_equivalent_to(shardings[param_name], leaf.ndim), (
                jax.tree_util.keystr(path), leaf.sharding)
            checked += 1
    assert checked >= 2 * len(SHARDED_SHAPES)  # at least two moments per leaf


@pytest.mark.parametrize("module", ["ademamix", "adopt", "mars", "cautious", "adamsage",
                                    "kron"])
def test_docstring_examples_run(module):
    module = importlib.import_module(f"ravine.optim.{module}")
    # kron's own example (3 eager steps) costs seconds of compiling; its sections are
    # checked below and its numbers by test_kron_equals_psgd_jax.
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(module):
        if test.name != "ravine.optim.kron.kron":
            runner.run(test)
    results = runner.summarize(verbose=False)
    assert results.attempted >= 2 and results.failed == 0, results
    public = [getattr(module, name) for name in dir(module)
              if not name.startswith("_") and getattr(getattr(module, name), "__module__", "")
              == module.__name__ and callable(getattr(module, name))
              and not isinstance(getattr(module, name), type)]
    for function in public:
        for section in ("Args:", "Returns:", "References:"):
            assert section in function.__doc__, (function.__name__, section)
