"""Second order and signs: Newton's method, Adam as sign descent, a transformer's per-block Hessian.

1. Newton's method, x <- x - H(x)^-1 grad f(x) with the exact Hessian (jax.hessian) and a
   dense solve, against GD and Adam, to (f - f*) / (f(x0) - f*) <= --target:
   * on a quadratic (d = --dim, eigenvalues geometric in [1, --kappa], random rotation) the
     Newton step is exact: one step, whatever kappa. GD at its best step 2/(L + mu) shrinks
     the gap by ((kappa - 1)/(kappa + 1))^2 per step, ~ kappa/4 ln(1/target) steps; Adam is
     run at each of --adam_lrs (the best is reported). At a constant lr Adam can touch the
     target and leave it again (v shrinks with the gradient, so its step grows): the demo
     reports the first step at the target and the step from which the gap stays below it.
     Cost: GD and Adam steps are one gradient (2 d^2 FLOPs for a dense quadratic, O(d)
     memory); a Newton step forms H (d^2 floats; d Hessian-vector products, ~2 d^3 FLOPs
     here) and solves with it (LU, 2/3 d^3 FLOPs). So Newton wins while d^3 < kappa d^2
     ln(1/target) / 2, i.e. d < ~kappa ln(1/target) / 2; timed below for several d.
   * on Rosenbrock (1 - x)^2 + 100 (y - x^2)^2 from (-1.5, 2) pure Newton takes a handful
     of steps; near the minimum e_{k+1} ~ C e_k^2 with e = |x - x*| (quadratic convergence);
     the local constant is C = |H^-1 D^3f[e^, e^]| / 2 for the direction e^ of e_k, computed
     at x* and printed beside the measured e_{k+1}/e_k^2. Rosenbrock jumps from e ~ 0.6 to
     1e-3 to 1e-7 to 0, one ratio in the quadratic phase; l2-regularized logistic regression
     (d = 20) shows several.
2. Adam with b1 = b2 = 0 and eps = 0 is sign descent: m^_t = g_t and v^_t = g_t^2 (the bias
   corrections 1 - 0^t are 1), so the step is -lr g / |g| = -lr sign(g) exactly in IEEE
   arithmetic (sqrt(fl(g^2)) = |g| when g^2 neither underflows nor overflows; g = 0 gives
   0/0). Checked on random pytrees op by op, and under jax.jit, where XLA turns m / sqrt(v)
   into m * rsqrt(v) (not correctly rounded: |step| is lr to within a few ulp, the signs
   agree), and along a jitted Rosenbrock trajectory against `-lr * sign(grad)`.
3. A tiny byte-level transformer (`models.Transformer`, d_model 64, 2 layers) trained with
   `optim.adam`. At the end, per parameter block (each leaf), Lanczos on that block's Hessian
   (`optim.diagnostics.lanczos` on the Hessian-vector product masked to the block, so one
   compiled program serves every block; the same numbers as closing the loss over the other
   blocks, which the test checks against a dense eigvalsh): the top eigenvalue, the most
   negative one, and a condition estimate lambda_max / mean(max(lambda, 0)) from the block's
   Lanczos quadrature (for a positive semidefinite block a lower bound on
   lambda_max / lambda_min+). Beside it, Adam's effective per-coordinate step
   lr / (sqrt(v^) + eps) (median and mean over the block's coordinates that ever had a
   gradient: embedding rows of bytes the training batches never held have v = 0), and the
   same spectrum of the preconditioned block D^1/2 H D^1/2 (D = that step, on the coordinates
   Adam has updated): if Adam acts as a diagonal preconditioner, the preconditioned top
   eigenvalues agree across blocks far better than the raw ones. Along training
   (--checkpoints), stochastic Lanczos quadrature of the whole Hessian gives the negative
   eigenvalue mass tr|H-| / tr|H| (saddles: Dauphin et al. 2014, arXiv 1406.2572; Ghorbani,
   Krishnan & Xiao 2019, arXiv 1901.10159). Every Hessian here is that of the loss on one
   fixed batch of 4 x 64 bytes (measured once with 16 x 64: negative mass 0.54 / 0.43 at
   steps 0 / 300 against 0.53 / 0.44).
   The seed's claims: embeddings have a condition number ~1e4; Adam acts as a diagonal
   preconditioner. Measured (docs/demos/second_order.json, 300 steps): the embedding's
   estimate is ~5e2, like the other matrices' (1e2-1e3; it is a lower bound, and a quarter
   of the embedding rows, bytes never seen, have zero curvature); Adam's scaling brings the
   matrices' top eigenvalues from a 26x spread to 5x and lowers 20 of 21 blocks' condition
   estimates, by a median 1.4x; the negative mass stays ~0.44-0.53 along training.

  python -m ravine.experiments.demos.second_order --dim=100 --kappa=1000 --lm_steps=300
"""
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags
from flax import linen as nn
from jax.flatten_util import ravel_pytree

from ravine import models
from ravine import optim
from ravine.experiments.demos import _common
from ravine.experiments.runtime import cli
from ravine.experiments.runtime import data
from ravine.optim import diagnostics

ROSENBROCK_START = (-1.5, 2.0)
ROSENBROCK_MINIMUM = (1.0, 1.0)

# --- 1. Newton's method against GD and Adam -----------------------------------------------


def rosenbrock(x):
    return (1.0 - x[0]) ** 2 + 100.0 * (x[1] - x[0] ** 2) ** 2


def quadratic(dim, kappa, seed=0):
    """`(f, x_star)`: f(x) = x^T A x / 2 - b^T x with eig(A) geometric in [1, kappa] and a random
    rotation, x* = A^-1 b of unit norm. Float64 (call under `jax.enable_x64`)."""
    rotation_key, target_key = jax.random.split(jax.random.key(seed))
    rotation, _ = jnp.linalg.qr(jax.random.normal(rotation_key, (dim, dim), jnp.float64))
    matrix = (rotation * jnp.geomspace(1.0, kappa, dim)) @ rotation.T
    x_star = jax.random.normal(target_key, (dim,), jnp.float64)
    x_star = x_star / jnp.linalg.norm(x_star)
    b = matrix @ x_star
    return (lambda x: 0.5 * x @ matrix @ x - b @ x), x_star


def logistic_regression(dim=20, examples=200, l2=1e-3, seed=0):
    """`(f, path)`: mean logistic loss of labels drawn from a random linear model plus
    l2/2 |x|^2, and 30 Newton iterates from 0, whose last is x* to float64 precision. Float64."""
    inputs_key, truth_key, labels_key = jax.random.split(jax.random.key(seed), 3)
    inputs = jax.random.normal(inputs_key, (examples, dim), jnp.float64)
    truth = jax.random.normal(truth_key, (dim,), jnp.float64)
    labels = jax.random.bernoulli(labels_key, jax.nn.sigmoid(inputs @ truth)).astype(
        jnp.float64)

    def f(x):
        logits = inputs @ x
        return jnp.mean(jnp.logaddexp(0.0, logits) - labels * logits) + 0.5 * l2 * x @ x

    return f, newton(f, jnp.zeros(dim), 30)


def newton_step(f):
    """x -> x - H(x)^-1 grad f(x), H by `jax.hessian` and a dense solve."""
    def step(x):
        return x - jnp.linalg.solve(jax.hessian(f)(x), jax.grad(f)(x))
    return step


def newton(f, x0, steps):
    """Iterates x_0..x_steps of pure Newton (float64 numpy [steps + 1, d])."""
    step = jax.jit(newton_step(f))
    xs = [jnp.asarray(x0, jnp.float64)]
    for _ in range(steps):
        xs.append(step(xs[-1]))
    return np.stack([np.asarray(x) for x in xs])


def first_order(f, tx, x0, steps):
    """f(x_t) for t = 0..steps under the optax transformation `tx` (float64 numpy)."""
    def step(carry, _):
        x, state = carry
        updates, state = tx.update(jax.grad(f)(x), state, x)
        x = optax.apply_updates(x, updates)
        return (x, state), f(x)

    x0 = jnp.asarray(x0, jnp.float64)
    _, values = jax.jit(lambda x: jax.lax.scan(step, (x, tx.init(x)), length=steps))(x0)
    return np.concatenate([[float(f(x0))], np.asarray(values)])


def steps_to(gaps, target):
    """First t with gaps[t] <= target (the gaps relative to the start), or None."""
    hit = np.flatnonzero(np.asarray(gaps) <= target)
    return int(hit[0]) if hit.size else None


def stays_below_from(gaps, target):
    """First t from which every later gap is <= target, or None (Adam touches a target and
    leaves it again: its effective step grows as v decays with the gradient)."""
    above = np.flatnonzero(np.asarray(gaps) > target)
    if not above.size:
        return 0
    return int(above[-1]) + 1 if above[-1] + 1 < len(gaps) else None


def race(f, x0, f_star, gd_lrs, adam_lrs, max_steps, newton_steps, target):
    """Newton, GD (best of `gd_lrs`) and Adam (best of `adam_lrs`) on f from x0: relative gaps
    (f - f*)/(f(x0) - f*) per step and steps to `target` (None: not within max_steps)."""
    scale = float(f(jnp.asarray(x0, jnp.float64))) - f_star
    xs = newton(f, x0, newton_steps)
    newton_gaps = np.asarray([float(f(jnp.asarray(x))) - f_star for x in xs]) / scale
    out = {"newton": {"gaps": newton_gaps, "steps": steps_to(newton_gaps, target),
                      "stays_from": stays_below_from(newton_gaps, target),
                      "final_gap": float(newton_gaps[-1]), "iterates": xs}}
    for name, make, lrs in (("gd", optim.sgd, gd_lrs), ("adam", optim.adam, adam_lrs)):
        if not lrs:
            continue
        best = None
        for lr in lrs:
            gaps = (first_order(f, make(lr), x0, max_steps) - f_star) / scale
            gaps = np.where(np.isfinite(gaps), gaps, np.inf)
            reached = steps_to(gaps, target)
            key = (reached if reached is not None else math.inf, float(np.min(gaps)))
            if best is None or key < best[0]:
                best = (key, {"lr": lr, "gaps": gaps, "steps": reached,
                              "stays_from": stays_below_from(gaps, target),
                              "best_gap": float(np.min(gaps)),
                              "final_gap": float(gaps[-1])})
        out[name] = best[1]
    return out


def quadratic_convergence(xs, x_star, f):
    """Errors e_k = |x_k - x*|, measured e_{k+1}/e_k^2, and the local constant at x* for the
    direction of e_k, |H^-1 D^3 f(x*)[e^, e^]| / 2 (for e_k between 1e-7 and 1e-1, where
    e_{k+1} stays clear of float64 rounding)."""
    x_star = np.asarray(x_star, np.float64)
    errors = np.linalg.norm(np.asarray(xs) - x_star, axis=1)
    hessian, third = (np.asarray(a) for a in jax.jit(
        lambda x: (jax.hessian(f)(x), jax.jacfwd(jax.hessian(f))(x)))(jnp.asarray(x_star)))
    rows = []
    for k in range(errors.size - 1):
        if 1e-7 < errors[k] < 1e-1 and errors[k + 1] > 0:
            direction = (np.asarray(xs[k]) - x_star) / errors[k]
            curvature = np.einsum("ijk,j,k->i", third, direction, direction)
            predicted = 0.5 * float(np.linalg.norm(np.linalg.solve(hessian, curvature)))
            rows.append({"k": k, "error": float(errors[k]), "next_error": float(errors[k + 1]),
                         "measured": float(errors[k + 1] / errors[k] ** 2),
                         "predicted": predicted})
    return {"errors": errors.tolist(), "rows": rows}


def timed(fn, *args, repeats=3):
    """Median wall time of `fn(*args)` (jitted; compiled by a first call), in seconds."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def cost_scaling(dims=(50, 100, 200, 400), kappa=1000.0, target=1e-10, seed=0):
    """Per d: wall time of one Newton step and of one GD step, GD's steps to `target`
    (a while loop at 2/(L + mu)) and the time of each whole run, with FLOP counts."""
    rows = []
    for dim in dims:
        f, x_star = quadratic(dim, kappa, seed)
        x0 = jnp.zeros(dim, jnp.float64)
        gap0 = float(f(x0) - f(x_star))
        lr = 2.0 / (1.0 + kappa)
        newton_fn = jax.jit(newton_step(f))
        gd_fn = jax.jit(lambda x: x - lr * jax.grad(f)(x))

        @jax.jit
        def gd_to_target(x):
            def not_done(carry):
                return (f(carry[1]) - f(x_star) > target * gap0) & (carry[0] < 10**7)
            return jax.lax.while_loop(not_done, lambda c: (c[0] + 1, gd_fn(c[1])), (0, x))

        newton_time = timed(newton_fn, x0)
        gd_steps = int(gd_to_target(x0)[0])
        rows.append({
            "dim": dim, "newton_step_s": newton_time, "gd_step_s": timed(gd_fn, x0, repeats=20),
            "gd_steps": gd_steps, "gd_total_s": timed(gd_to_target, x0, repeats=1),
            "newton_gap_after_one_step": float(f(newton_fn(x0)) - f(x_star)) / gap0,
            "newton_flops": 2.0 * dim**3 + 2.0 * dim**3 / 3, "gd_step_flops": 2.0 * dim**2,
            "newton_memory_floats": dim**2, "gd_memory_floats": dim})
    return rows


def random_gradients(key, shapes, t):
    """A pytree of Gaussian gradients scaled by 10^U(-4.5, 4.5) (nine orders of magnitude)."""
    leaves = []
    for i, shape in enumerate(shapes):
        k1, k2 = jax.random.split(jax.random.fold_in(key, 100 * t + i))
        leaves.append(jax.random.normal(k1, shape) * 10.0 ** jax.random.uniform(
            k2, shape, minval=-4.5, maxval=4.5))
    return {f"leaf{i}": leaf for i, leaf in enumerate(leaves)}


def sign_descent_identity(key, lr=0.1, steps=3, shapes=((5, 7), (3,), (2, 2, 2))):
    """adam(lr, b1=0, b2=0, eps=0) against -lr sign(g) over `steps` updates of random pytrees.

    Returns the largest |update + lr sign(g)| with the updates computed op by op (eager: IEEE
    division and square root, the identity is exact), and, under jax.jit, whether every sign
    agrees, the largest relative deviation |update| / lr - 1 and the fraction of entries
    that deviate at all (XLA rewrites m / sqrt(v) as m * rsqrt(v), which is not correctly
    rounded).
    """
    params = {f"leaf{i}": jnp.zeros(shape) for i, shape in enumerate(shapes)}
    tx = optim.adam(lr, b1=0.0, b2=0.0, eps=0.0)
    jitted = jax.jit(tx.update)
    eager_state = jit_state = tx.init(params)
    eager, relative, signs, off, entries = 0.0, 0.0, True, 0, 0
    for t in range(steps):
        grads = random_gradients(key, shapes, t)
        updates, eager_state = tx.update(grads, eager_state, params)
        compiled, jit_state = jitted(grads, jit_state, params)
        for u, c, g in zip(*(jax.tree.leaves(x) for x in (updates, compiled, grads))):
            u, c, g = np.asarray(u), np.asarray(c), np.asarray(g)
            eager = max(eager, float(np.max(np.abs(u + lr * np.sign(g)))))
            signs = signs and bool(np.array_equal(np.sign(c), -np.sign(g)))
            deviation = np.abs(np.abs(c) / np.float32(lr) - 1)
            relative = max(relative, float(np.max(deviation)))
            off += int(np.sum(np.abs(c) != np.float32(lr)))
            entries += c.size
    return {"eager_max_deviation": eager, "jit_signs_equal": signs,
            "jit_max_relative_deviation": relative, "jit_fraction_off": off / entries}


def sign_descent_trajectories(lr=1e-3, steps=2000):
    """Rosenbrock iterates of adam(lr, b1=0, b2=0, eps=0) and of x <- x - lr sign(grad)
    (float32) and their largest difference."""
    def run(update):
        def step(x, _):
            x = update(x)
            return x, x
        start = jnp.asarray(ROSENBROCK_START, jnp.float32)
        return np.asarray(jax.jit(lambda x: jax.lax.scan(step, x, length=steps)[1])(start))

    tx = optim.adam(lr, b1=0.0, b2=0.0, eps=0.0)

    def adam_run():
        def step(carry, _):
            x, state = carry
            updates, state = tx.update(jax.grad(rosenbrock)(x), state, x)
            x = optax.apply_updates(x, updates)
            return (x, state), x
        start = jnp.asarray(ROSENBROCK_START, jnp.float32)
        return np.asarray(jax.jit(lambda x: jax.lax.scan(step, (x, tx.init(x)),
                                                         length=steps)[1])(start))

    adam_path = adam_run()
    sign_path = run(lambda x: x - lr * jnp.sign(jax.grad(rosenbrock)(x)))
    return {"adam": adam_path, "sign": sign_path,
            "max_difference": float(np.max(np.abs(adam_path - sign_path)))}


# --- 3. A tiny transformer's per-block Hessian ----------------------------------------------


def lm_loss_fn(model):
    """loss(params, tokens[B, T+1]) = next-byte cross-entropy."""
    def loss(params, tokens):
        logits = model.apply({"params": params}, tokens[:, :-1])
        return models.cross_entropy(logits, tokens[:, 1:])
    return loss


def block_names(params):
    """'/'-joined key paths of the leaves, in `ravel_pytree` order."""
    return ["/".join(str(getattr(k, "key", k)) for k in path)
            for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]


def block_masks(params):
    """{block name: flat 0/1 float32 mask over ravel_pytree(params)}."""
    names = block_names(params)
    sizes = [leaf.size for leaf in jax.tree.leaves(params)]
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    masks = {}
    for name, start, stop in zip(names, offsets[:-1], offsets[1:]):
        mask = np.zeros(offsets[-1], np.float32)
        mask[start:stop] = 1.0
        masks[name] = mask
    return masks


def masked_lanczos(loss_fn, params, batch, scale, num_lanczos, num_probes, key):
    """Lanczos quadrature of diag(s) H diag(s), s = `scale` (flat; zero off the block).

    With s the block's 0/1 mask this is the block's Hessian H_bb (padded with zeros), with
    s = mask * sqrt(d) the preconditioned block D^1/2 H_bb D^1/2. Probes are Gaussian on the
    block (s != 0), so the Krylov space stays in it. Returns (nodes, weights), each
    [num_probes, num_lanczos]: Ritz values and their quadrature weights (rows sum to 1).
    """
    flat, unravel = ravel_pytree(params)
    grad_fn = jax.grad(lambda z: loss_fn(unravel(z), batch))

    def matvec(v):
        return scale * jax.jvp(grad_fn, (flat,), (scale * v,))[1]

    support = (scale != 0).astype(flat.dtype)
    probe_key, restart_key = jax.random.split(key)
    probes = jax.random.normal(probe_key, (num_probes, flat.size), flat.dtype) * support

    def one(probe):
        tri = diagnostics.lanczos(matvec, probe, num_lanczos, restart_key).tridiagonal()
        nodes, vectors = jnp.linalg.eigh(tri)
        return nodes, vectors[0] ** 2

    return jax.vmap(one)(probes)


def spectrum_summary(nodes, weights):
    """Top and bottom Ritz values, mean positive eigenvalue, condition estimate
    lambda_max / mean(lambda+), and the negative mass tr|H-| / tr|H| (quadrature means)."""
    nodes, weights = np.asarray(nodes, np.float64), np.asarray(weights, np.float64)
    top, bottom = float(nodes.max()), float(nodes.min())
    positive = float(np.mean(np.sum(weights * np.maximum(nodes, 0.0), axis=1)))
    negative = float(np.mean(np.sum(weights * np.maximum(-nodes, 0.0), axis=1)))
    return {"top": top, "bottom": bottom, "mean_positive": positive,
            "condition_estimate": top / positive if positive > 0 else math.inf,
            "negative_mass": negative / (negative + positive) if negative + positive > 0
            else 0.0}


def train_lm(corpus, config, steps=300, lr=3e-3, batch_size=16, seq_len=64, seed=0,
             checkpoints=(0, 300)):
    """Adam on the byte LM; returns the model's loss, params / Adam state at each checkpoint
    and the training losses."""
    model = models.Transformer(config)
    first = jnp.asarray(data.sample_batch(corpus, seed, 0, batch_size, seq_len)[0], jnp.int32)
    params = nn.unbox(jax.jit(model.init)(_common.prng_key(seed), first[:, :-1]))["params"]
    loss_fn = lm_loss_fn(model)
    tx = optim.adam(lr)

    @jax.jit
    def step(params, state, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    state = tx.init(params)
    saved, losses = {}, []
    for t in range(steps + 1):
        if t in checkpoints:
            saved[t] = (params, state)
        if t == steps:
            break
        tokens = jnp.asarray(data.sample_batch(corpus, seed, t, batch_size, seq_len)[0],
                             jnp.int32)
        params, state, loss = step(params, state, tokens)
        losses.append(float(loss))
    return loss_fn, saved, np.asarray(losses)


def adam_effective_step(state, lr, b2=0.999, eps=1e-8):
    """lr / (sqrt(v^) + eps) per coordinate (flat), v^ = nu / (1 - b2^t) from Adam's state,
    and whether the coordinate has seen a nonzero gradient (nu > 0)."""
    count = int(optax.tree.get(state, "count"))
    nu, _ = ravel_pytree(optax.tree.get(state, "nu"))
    return lr / (jnp.sqrt(nu / (1.0 - b2**count)) + eps), nu > 0


def transformer_hessian(corpus, config, steps=300, lr=3e-3, batch_size=16, seq_len=64,
                        hessian_batch=4, checkpoints=(0, 30, 100, 300), num_lanczos=30,
                        num_probes=1, seed=0):
    """Per-block spectra (raw and Adam-preconditioned) at the end of training and the whole
    Hessian's negative mass at each checkpoint."""
    checkpoints = tuple(sorted({t for t in checkpoints if t <= steps} | {steps}))
    loss_fn, saved, losses = train_lm(corpus, config, steps, lr, batch_size, seq_len, seed,
                                      checkpoints)
    batch = jnp.asarray(data.sample_batch(corpus, seed + 1, 0, hessian_batch, seq_len,
                                          stream=data.EVAL_STREAM)[0], jnp.int32)
    spectrum = jax.jit(lambda p, s, k: masked_lanczos(loss_fn, p, batch, s, num_lanczos,
                                                      num_probes, k))
    key = _common.prng_key(seed + 2)
    along = {}
    for t in checkpoints:
        params, _ = saved[t]
        ones = jnp.ones(ravel_pytree(params)[0].size)
        along[t] = {**spectrum_summary(*spectrum(params, ones, key)),
                    "loss": float(loss_fn(params, batch))}
    params, state = saved[steps]
    ndims = dict(zip(block_names(params), (leaf.ndim for leaf in jax.tree.leaves(params))))
    effective, touched = adam_effective_step(state, lr)
    touched_mask = np.asarray(touched)
    touched = jnp.asarray(touched, jnp.float32)
    blocks = {}
    for name, mask in block_masks(params).items():
        mask = jnp.asarray(mask)
        raw = spectrum_summary(*spectrum(params, mask, key))
        # Coordinates Adam never updated (bytes absent from every training batch) are left
        # out of the preconditioned block: their lr/eps step is not a curvature estimate.
        pre = spectrum_summary(*spectrum(params, mask * touched * jnp.sqrt(effective), key))
        in_block = np.asarray(mask) > 0
        steps_seen = np.asarray(effective)[in_block & touched_mask]
        blocks[name] = {"size": int(mask.sum()), "ndim": ndims[name], "raw": raw,
                        "preconditioned": pre,
                        "adam_step_median": float(np.median(steps_seen)),
                        "adam_step_mean": float(np.mean(steps_seen)),
                        "never_updated": float(1 - np.sum(in_block & touched_mask)
                                               / np.sum(in_block))}
    return {"losses": losses, "along_training": along, "blocks": blocks, "steps": steps,
            "lr": lr}


def spread(values):
    """max / min of positive values (how far apart the blocks are)."""
    values = [v for v in values if v > 0]
    return max(values) / min(values) if values else math.nan


def spreads(blocks):
    """Spread of the blocks' top eigenvalues, raw and preconditioned, over all blocks and over
    the matrices alone (the 1-D norm gains have curvature 100x smaller than any matrix)."""
    out = {}
    for subset, keep in (("all", lambda b: True), ("matrices", lambda b: b["ndim"] >= 2)):
        chosen = [b for b in blocks.values() if keep(b)]
        out[subset] = {kind: spread([b[kind]["top"] for b in chosen])
                       for kind in ("raw", "preconditioned")}
    return out


# --- Running, printing, plotting -------------------------------------------------------------


def run_newton_part(dim=100, kappa=1000.0, target=1e-10, max_steps=20000,
                    adam_lrs=(1e-1, 1e-2, 1e-3), cost_dims=(50, 100, 200, 400), seed=0):
    with jax.enable_x64(True):
        f, x_star = quadratic(dim, kappa, seed)
        quad = race(f, jnp.zeros(dim), 0.0 + float(f(x_star)), (2.0 / (1.0 + kappa),),
                    adam_lrs, max_steps, 3, target)
        rosen = race(rosenbrock, jnp.asarray(ROSENBROCK_START), 0.0, (1e-3,), adam_lrs,
                     100_000, 12, target)
        convergence = quadratic_convergence(rosen["newton"]["iterates"], ROSENBROCK_MINIMUM,
                                            rosenbrock)
        logistic, path = logistic_regression(seed=seed)
        logistic_convergence = quadratic_convergence(path[:9], path[-1], logistic)
        costs = cost_scaling(cost_dims, kappa, target, seed) if cost_dims else []
    return {"quadratic": quad, "rosenbrock": rosen, "rosenbrock_convergence": convergence,
            "logistic_convergence": logistic_convergence, "costs": costs}


def run(dim=100, kappa=1000.0, target=1e-10, max_steps=20000, adam_lrs=(1e-1, 1e-2, 1e-3),
        cost_dims=(50, 100, 200, 400), corpus_path="", lm_steps=300, lm_lr=3e-3, d_model=64,
        n_layers=2, checkpoints=(0, 30, 100, 300), num_lanczos=30, num_probes=1, seed=0):
    result = run_newton_part(dim, kappa, target, max_steps, adam_lrs, cost_dims, seed)
    result["sign_identity"] = sign_descent_identity(jax.random.key(seed))
    result["sign_trajectories"] = sign_descent_trajectories()
    if lm_steps:
        corpus = (corpus_path if isinstance(corpus_path, data.Corpus)
                  else data.load_corpus(corpus_path))
        data.check_length(corpus, 64)
        config = models.TransformerConfig(vocab_size=256, d_model=d_model, n_layers=n_layers,
                                          n_heads=2, max_len=64)
        result["transformer"] = transformer_hessian(
            corpus.train, config, lm_steps, lm_lr, checkpoints=checkpoints,
            num_lanczos=num_lanczos, num_probes=num_probes, seed=seed)
    return result


def plot(result, outdir, dpi=100):
    has_lm = "transformer" in result
    fig, axes = _common.plt.subplots(1, 4 if has_lm else 2, figsize=(20 if has_lm else 10, 4))
    for ax, problem in zip(axes, ("quadratic", "rosenbrock")):
        race_result = result[problem]
        for name, color in (("newton", "C0"), ("gd", "C1"), ("adam", "C2")):
            gaps = np.maximum(race_result[name]["gaps"], 1e-20)
            label = name + ("" if name == "newton" else f" lr={race_result[name]['lr']:.3g}")
            ax.loglog(np.arange(1, gaps.size + 1), gaps, ".-" if name == "newton" else "-",
                      color=color, label=label)
        ax.axhline(1e-10, color="k", ls=":", lw=1)
        ax.set(xlabel="iteration + 1", ylabel="(f - f*) / (f(x0) - f*)", title=problem)
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    if has_lm:
        lm = result["transformer"]
        names = list(lm["blocks"])
        short = [n.replace("block_", "b").replace("/kernel", "").replace("/scale", "")
                 .replace("/embedding", "") for n in names]
        ax = axes[2]
        x = np.arange(len(names))
        raw = [lm["blocks"][n]["raw"]["top"] for n in names]
        pre = [lm["blocks"][n]["preconditioned"]["top"] for n in names]
        ax.semilogy(x, raw, "o", label="lambda_max(H_block)")
        ax.semilogy(x, pre, "s", label="lambda_max(D^1/2 H D^1/2), D = Adam step")
        ax.semilogy(x, [lm["blocks"][n]["raw"]["condition_estimate"] for n in names], "^",
                    label="condition estimate (raw)")
        ax.set_xticks(x, short, rotation=90, fontsize=7)
        ax.set_title(f"Per-block Hessian after {lm['steps']} Adam steps")
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
        ax = axes[3]
        steps = sorted(lm["along_training"])
        ax.plot(steps, [lm["along_training"][t]["negative_mass"] for t in steps], "o-",
                label="tr|H-| / tr|H|")
        ax.set(xlabel="Adam step", ylabel="negative eigenvalue mass",
               title="Saddles: negative curvature along training")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    return _common.save_figure(fig, outdir, "second_order", dpi)


def record(result):
    """JSON-able numbers (curves dropped)."""
    def race_summary(race_result):
        return {name: {k: v for k, v in r.items() if k not in ("gaps", "iterates")}
                for name, r in race_result.items()}

    out = {"quadratic": race_summary(result["quadratic"]),
           "rosenbrock": race_summary(result["rosenbrock"]),
           "rosenbrock_convergence": result["rosenbrock_convergence"],
           "logistic_convergence": result["logistic_convergence"],
           "costs": result["costs"],
           "sign_identity": result["sign_identity"],
           "sign_trajectory_max_difference": result["sign_trajectories"]["max_difference"]}
    if "transformer" in result:
        lm = result["transformer"]
        out["transformer"] = {
            "steps": lm["steps"], "lr": lm["lr"], "final_train_loss": float(lm["losses"][-1]),
            "along_training": {str(t): v for t, v in lm["along_training"].items()},
            "blocks": lm["blocks"], "spread_of_top_eigenvalues": spreads(lm["blocks"])}
    return out


def write_results(result, outdir):
    return _common.write_results("second_order", record(result), outdir)


def describe(steps):
    return "not reached" if steps is None else f"{steps}"


def main(argv):
    del argv
    corpus = FLAGS.corpus
    with cli.usage_errors(OSError):
        if FLAGS.lm_steps:
            corpus = data.load_corpus(FLAGS.corpus)
            data.check_length(corpus, 64)
    checkpoints = tuple(_common.numbers(FLAGS.checkpoints, int))
    result = run(FLAGS.dim, FLAGS.kappa, FLAGS.target, FLAGS.max_steps,
                 tuple(_common.numbers(FLAGS.adam_lrs)),
                 tuple(_common.numbers(FLAGS.cost_dims, int)), corpus, FLAGS.lm_steps,
                 FLAGS.lm_lr, FLAGS.d_model, FLAGS.n_layers, checkpoints, FLAGS.num_lanczos,
                 FLAGS.num_probes, FLAGS.seed)
    print(f"steps to (f - f*)/(f(x0) - f*) <= {FLAGS.target:g}, first reached / stays below "
          "from (GD, Adam: best lr of the grid), and the gap at the last step")
    for problem, label in (("quadratic", f"quadratic d={FLAGS.dim}, kappa={FLAGS.kappa:g}"),
                           ("rosenbrock", "Rosenbrock from (-1.5, 2)")):
        r = result[problem]
        cells = []
        for name in ("newton", "gd", "adam"):
            lr = "" if name == "newton" else f" (lr={r[name]['lr']:.3g})"
            cells.append(f"{name}{lr} {describe(r[name]['steps'])} / "
                         f"{describe(r[name]['stays_from'])}, last {r[name]['final_gap']:.0e}")
        print(f"  {label}: " + "; ".join(cells))
    for key, label in (("rosenbrock_convergence", "Rosenbrock"),
                       ("logistic_convergence", "logistic regression (d=20, 200 examples)")):
        conv = result[key]
        print(f"Newton on {label}, e_k = |x_k - x*|: " + ", ".join(
            f"{e:.2e}" for e in conv["errors"] if e > 0) + ", then 0")
        for row in conv["rows"]:
            print(f"  e_{row['k'] + 1}/e_{row['k']}^2 = {row['measured']:.3f}, local constant "
                  f"|H^-1 D^3f[e^,e^]|/2 at x* = {row['predicted']:.3f}")
    if result["costs"]:
        print(f"cost on the quadratic (kappa={FLAGS.kappa:g}): one Newton step vs GD to the target")
        print("  " + "d".rjust(6) + "newton step".rjust(14) + "(FLOPs)".rjust(10)
              + "gd step".rjust(12) + "(FLOPs)".rjust(10) + "gd steps".rjust(10)
              + "gd total".rjust(11) + "H floats".rjust(11))
        for c in result["costs"]:
            print(f"  {c['dim']:6d}{c['newton_step_s'] * 1e3:11.2f} ms{c['newton_flops']:10.1e}"
                  f"{c['gd_step_s'] * 1e6:9.1f} us{c['gd_step_flops']:10.1e}{c['gd_steps']:10d}"
                  f"{c['gd_total_s'] * 1e3:8.1f} ms{c['newton_memory_floats']:11d}")
    sign = result["sign_identity"]
    print(f"Adam(b1=b2=0, eps=0) vs -lr*sign(g) on random pytrees: op by op max |difference| "
          f"{sign['eager_max_deviation']:.1e}; jitted: signs equal {sign['jit_signs_equal']}, "
          f"| |step|/lr - 1 | <= {sign['jit_max_relative_deviation']:.1e} "
          f"({sign['jit_fraction_off']:.0%} of entries off, XLA's rsqrt); along 2000 jitted "
          f"Rosenbrock steps max |x_adam - x_sign| = "
          f"{result['sign_trajectories']['max_difference']:.1e}")
    if "transformer" in result:
        lm = result["transformer"]
        print(f"tiny transformer (d_model={FLAGS.d_model}, {FLAGS.n_layers} layers), Adam "
              f"lr={FLAGS.lm_lr:g}: train loss {lm['losses'][0]:.3f} -> {lm['losses'][-1]:.3f}")
        print("  " + "block".ljust(30) + "size".rjust(7) + "lambda_max".rjust(12)
              + "lambda_min".rjust(12) + "cond.est".rjust(10) + "adam step".rjust(11)
              + "precond max".rjust(13) + "cond.est".rjust(10))
        for name, b in lm["blocks"].items():
            print(f"  {name:30s}{b['size']:7d}{b['raw']['top']:12.3g}{b['raw']['bottom']:12.3g}"
                  f"{b['raw']['condition_estimate']:10.3g}{b['adam_step_median']:11.3g}"
                  f"{b['preconditioned']['top']:13.3g}"
                  f"{b['preconditioned']['condition_estimate']:10.3g}")
        print("  (adam step: median of lr/(sqrt(v^)+eps) over the coordinates updated so far; "
              "cond.est: lambda_max / mean positive eigenvalue)")
        spread_of = spreads(lm["blocks"])
        print("  top eigenvalue max/min over blocks: " + "; ".join(
            f"{subset}: raw {s['raw']:.3g}, Adam-preconditioned {s['preconditioned']:.3g}"
            for subset, s in spread_of.items()))
        print("  negative eigenvalue mass tr|H-|/tr|H| along training: " + ", ".join(
            f"step {t}: {v['negative_mass']:.3f} (lambda_min {v['bottom']:.3g}, lambda_max "
            f"{v['top']:.3g})" for t, v in sorted(lm["along_training"].items())))
    print("saved", plot(result, FLAGS.outdir, FLAGS.dpi))
    print("saved", write_results(result, FLAGS.outdir))


if __name__ == "__main__":
    flags.DEFINE_integer("dim", 100, "Dimension of the quadratic.", lower_bound=2)
    flags.DEFINE_float("kappa", 1000.0, "Condition number of the quadratic.", lower_bound=1.0)
    flags.DEFINE_float("target", 1e-10, "Relative gap (f - f*)/(f(x0) - f*) to reach.",
                       lower_bound=1e-15, upper_bound=1.0)
    flags.DEFINE_integer("max_steps", 20000, "GD / Adam steps on the quadratic.", lower_bound=1)
    _common.define_number_list("adam_lrs", ["0.1", "0.01", "0.001"], "Adam learning rates tried.")
    _common.define_number_list("cost_dims", ["50", "100", "200", "400"],
                               "Dimensions of the Newton-vs-GD cost comparison.", parse=int,
                               check=lambda d: d >= 2, requirement="integers >= 2")
    flags.DEFINE_string("corpus", "", "Text file or folder for the LM; empty = the Python "
                        "stdlib source.")
    flags.DEFINE_integer("lm_steps", 300, "Adam steps on the tiny LM (0 = skip part 3).",
                         lower_bound=0)
    flags.DEFINE_float("lm_lr", 3e-3, "Adam learning rate of the LM (> 0).")
    flags.register_validator("lm_lr", lambda lr: lr > 0, message="--lm_lr must be positive")
    flags.DEFINE_integer("d_model", 64, "LM width.", lower_bound=2)
    flags.DEFINE_integer("n_layers", 2, "LM blocks.", lower_bound=1)
    _common.define_number_list("checkpoints", ["0", "30", "100", "300"],
                               "Steps at which the whole Hessian's spectrum is estimated.",
                               parse=int, check=lambda t: t >= 0, requirement="integers >= 0")
    flags.DEFINE_integer("num_lanczos", 30, "Lanczos steps per probe.", lower_bound=2)
    flags.DEFINE_integer("num_probes", 1, "Lanczos probes per spectrum.", lower_bound=1)
    flags.DEFINE_integer("seed", 0, "Random seed.")
    _common.define_output_flags()
    FLAGS = flags.FLAGS
    cli.run(main)
