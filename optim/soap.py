"""SOAP: Adam in the eigenbasis of Shampoo's preconditioner.

Vyas et al. 2024, "SOAP: Improving and Stabilizing Shampoo using Adam"
(https://arxiv.org/abs/2409.11321); the update follows the authors' released code,
github.com/nikhilvyas/SOAP `soap.py` on `main` at commit a1e5535.
"""
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from jax import lax

from ravine.optim import _blocks, _validate
from ravine.optim.alias import MaskOrFn, decay_and_scale, scale_by_learning_rate

HIGHEST = _blocks.HIGHEST


class SoapBases(NamedTuple):
    """Per preconditioned leaf and dim: Shampoo's statistic and its eigenbasis, `(d_j, d_j)`.

    Dims that are not preconditioned (above `max_precond_dim`) hold None: identity basis.
    """
    stats: tuple
    bases: tuple


class SoapState(NamedTuple):
    count: jax.Array  # int32: gradients seen (it alone decides when bases are refreshed)
    mu: Any           # like params: Adam's first moment, in the current eigenbasis
    nu: Any           # like params: Adam's second moment, in the current eigenbasis
    bases: Any        # per leaf: SoapBases, or None for a leaf that is plain Adam


def _eigenbasis(stats):
    """Eigenvectors of symmetric matrices, columns by decreasing eigenvalue."""
    _, vectors = _blocks.per_matrix(jnp.linalg.eigh, stats)
    return vectors[..., ::-1]


def _power_step(stats, basis):
    """One power-iteration step from `basis` (SOAP's refresh): sort its columns by the
    eigenvalue estimates `diag(Q^T S Q)`, decreasing, then `Q <- qr(S Q)`.

    Returns the new basis and the sort order (which the second moment follows)."""
    estimates = jnp.einsum("...ij,...ik,...kj->...j", basis, stats, basis, precision=HIGHEST)
    order = jnp.argsort(-estimates, axis=-1)
    basis = jnp.take_along_axis(basis, order[..., None, :], axis=-1)
    q, _ = _blocks.per_matrix(jnp.linalg.qr, jnp.matmul(stats, basis, precision=HIGHEST))
    return q, order


def scale_by_soap(b1: float = 0.95, b2: float = 0.95, eps: float = 1e-8,
                  precondition_every: int = 10, max_precond_dim: int = 10000,
                  shampoo_b2: Optional[float] = None) -> optax.GradientTransformation:
    """SOAP's direction (Vyas et al. 2024): Adam run in the eigenbasis of Shampoo's factors.

    For a leaf G with ndim >= 2, every dim j with `d_j <= max_precond_dim` keeps Shampoo's
    statistic S_j and an orthonormal basis Q_j of its eigenvectors (other dims, 1-D leaves and
    scalars use the identity: a leaf without preconditioned dims is Adam, as below). At the
    first gradient (step 0) there is no update: the statistics become
    `S_j = (1 - c) G_(j) G_(j)^T` and the bases their eigenvectors (eigh, columns by
    decreasing eigenvalue), so that no gradient is ever projected onto a basis built from
    itself. At every later step t (t = 1, 2, ...):

        G'   = G x_0 Q_0 ... x_{k-1} Q_{k-1}         (matrix: Q_0^T G Q_1)
        m <- b1 m + (1 - b1) G',   v <- b2 v + (1 - b2) G'^2
        update = sqrt(1 - b2^t) / (1 - b1^t) * back-rotation of  m / (sqrt(v) + eps)
        S_j <- c S_j + (1 - c) G_(j) G_(j)^T         (c = shampoo_b2, default b2)

    and when t % precondition_every == 0 each basis takes one power step from the new S_j
    (sort Q_j's columns by diag(Q_j^T S_j Q_j), decreasing, then Q_j <- qr(S_j Q_j)), used
    from step t + 1. m is rotated into the new basis exactly; v, a diagonal second moment,
    is only re-ordered by the same sort. Adam's counter t starts at the second gradient; eps
    is added to sqrt(v) and the bias correction sits in the step size (effectively
    `eps / sqrt(1 - b2^t)` on the bias-corrected root).

    This is the released code (nikhilvyas/SOAP main, a1e5535) with its defaults
    `precondition_1d=False`, `merge_dims=False`, `normalize_grads=False`,
    `correct_bias=True`; test_soap checks it step by step against a numpy transcription.
    Differences: its eigh adds 1e-30 I to S (no effect in float32); a basis whose refresh
    comes out non-finite is kept here. (An earlier ravine version took an Adam step at the
    first gradient and carried v into a new basis by the squared rotation,
    `v <- (R o R) v`; on a Kronecker quadratic and a small MLP the rotation was no better
    than the re-ordering, within seed noise, so only the released rule is offered.)

    Bases of same-shape statistics (across leaves) are refreshed in one batched call, inside
    a `lax.cond` so other steps do not pay for them.

    Args:
      b1, b2: Adam's decay rates, in [0, 1).
      eps: Adam's eps, added to the root of the second moment.
      precondition_every: the eigenbases are refreshed every this many steps.
      max_precond_dim: dims larger than this keep the identity basis (no d x d matrices).
        It decides the state's structure: with `optax.inject_hyperparams` pass it in
        `static_args`.
      shampoo_b2: decay of the statistics S_j, in [0, 1); None: b2.

    Returns:
      An `optax.GradientTransformation`; `init` raises ValueError naming a complex leaf.

    Example:
      >>> tx = optax.chain(scale_by_soap(precondition_every=10),
      ...                  optax.scale_by_learning_rate(3e-3))
    """
    _validate.in_range("b1", b1)
    _validate.in_range("b2", b2)
    _validate.non_negative("eps", eps)
    _validate.positive_int("precondition_every", precondition_every)
    max_precond_dim = _blocks.static_value("max_precond_dim", max_precond_dim)
    _validate.non_negative_int("max_precond_dim", max_precond_dim)
    if shampoo_b2 is not None:
        _validate.in_range("shampoo_b2", shampoo_b2)
    stats_decay = b2 if shampoo_b2 is None else shampoo_b2

    def init_bases(param):
        dims = [d if param.ndim >= 2 and d <= max_precond_dim else None for d in param.shape]
        if all(d is None for d in dims):
            return None
        return SoapBases(
            stats=tuple(None if d is None else jnp.zeros((d, d), jnp.float32) for d in dims),
            bases=tuple(None if d is None else jnp.eye(d, dtype=jnp.float32) for d in dims))

    def init_fn(params):
        _blocks.reject_complex(params, "scale_by_soap")
        # The bases go where the params are, not inside Flax's param wrappers (nnx variables,
        # linen boxes): see optim._blocks.
        leaves, layout = _blocks.wrapped_leaves(params)
        return SoapState(count=jnp.zeros([], jnp.int32),
                         mu=optax.tree.zeros_like(params),
                         nu=optax.tree.zeros_like(params),
                         bases=layout.unflatten([init_bases(_blocks.unwrap(p)) for p in leaves]))

    def refresh(count, all_stats, all_bases, mus, nus):
        """New bases (same-shape ones in one batched call), moments carried into them."""
        pairs = [(s, q) for stats, bases in zip(all_stats, all_bases)
                 for s, q in zip(stats, bases) if s is not None]

        def new_basis(_, stats, basis):
            n = stats.shape[-1]
            unsorted = jnp.broadcast_to(jnp.arange(n), stats.shape[:-1])
            fresh, order = lax.cond(count == 0, lambda s, _: (_eigenbasis(s), unsorted),
                                    _power_step, stats, basis)
            ok = jnp.all(jnp.isfinite(fresh), axis=(-2, -1))
            return jnp.where(ok[..., None, None], fresh, basis), jnp.where(ok[..., None],
                                                                           order, unsorted)

        fresh = iter(_blocks.map_stacked(new_basis, pairs, [s.shape for s, _ in pairs]))
        new_bases, new_mus, new_nus = [], [], []
        for old_bases, mu, nu in zip(all_bases, mus, nus):
            refreshed = [None if q is None else next(fresh) for q in old_bases]
            bases = tuple(None if r is None else r[0] for r in refreshed)
            # R^T per dim, as multiply_dims wants it: old^T new.
            rotations = [None if q is None else jnp.matmul(old.T, q, precision=HIGHEST)
                         for old, q in zip(old_bases, bases)]
            new_bases.append(bases)
            new_mus.append(_blocks.multiply_dims(mu, rotations, 0))
            for axis, r in enumerate(refreshed):  # v follows the sort of the power step
                if r is not None:
                    nu = jnp.take(nu, r[1], axis=axis)
            new_nus.append(nu)
        return new_bases, new_mus, new_nus

    def update_fn(updates, state, params=None):
        del params
        count = state.count
        first = count == 0
        grads, treedef = jax.tree.flatten(updates)
        layout = _blocks.wrapped_leaves(updates)[1]
        leaf_bases = layout.flatten_up_to(state.bases)
        # Adam's step t is `count` (the first gradient takes none); its bias corrections
        # scale the step. At count 0 the (then meaningless) factor is replaced by 0.
        t = jnp.maximum(count, 1).astype(jnp.float32)
        step_size = jnp.where(first, 0.0, jnp.sqrt(1 - jnp.float32(b2) ** t)
                              / (1 - jnp.float32(b1) ** t))

        # Adam in the current bases (the identity for leaves without any).
        directions, mus, nus = [], [], []
        for grad, mu, nu, leaf in zip(grads, treedef.flatten_up_to(state.mu),
                                      treedef.flatten_up_to(state.nu), leaf_bases):
            g = grad.astype(jnp.float32)
            if leaf is not None:
                g = _blocks.multiply_dims(g, leaf.bases, 0)
            mu = mu.astype(jnp.float32)
            nu = nu.astype(jnp.float32)
            mus.append(jnp.where(first, mu, (1 - b1) * g + b1 * mu))
            nus.append(jnp.where(first, nu, (1 - b2) * jnp.square(g) + b2 * nu))
            direction = step_size * mus[-1] / (jnp.sqrt(nus[-1]) + eps)
            if leaf is not None:
                direction = _blocks.multiply_dims(direction, leaf.bases, 0, transpose=True)
            directions.append(direction.astype(grad.dtype))

        # This step's statistics; on refresh steps new bases, with the moments carried in.
        new_bases = list(leaf_bases)
        indices = [i for i, leaf in enumerate(leaf_bases) if leaf is not None]
        if indices:
            stats = [tuple(None if s is None else
                           (1 - stats_decay) * _blocks.gram(grads[i].astype(jnp.float32), j, 0)
                           + stats_decay * s for j, s in enumerate(leaf_bases[i].stats))
                     for i in indices]
            old = ([leaf_bases[i].bases for i in indices], [mus[i] for i in indices],
                   [nus[i] for i in indices])
            bases, carried_mus, carried_nus = lax.cond(
                count % precondition_every == 0,
                lambda *args: refresh(count, *args), lambda _, *rest: rest, stats, *old)
            for i, s, q, mu, nu in zip(indices, stats, bases, carried_mus, carried_nus):
                new_bases[i], mus[i], nus[i] = SoapBases(s, q), mu, nu

        state = SoapState(
            count=optax.safe_increment(count),
            mu=optax.tree.cast_like(treedef.unflatten(mus), state.mu),
            nu=optax.tree.cast_like(treedef.unflatten(nus), state.nu),
            bases=layout.unflatten(new_bases))
        return treedef.unflatten(directions), state

    return optax.GradientTransformation(init_fn, update_fn)


class SoapWithDecayState(NamedTuple):
    soap: SoapState  # the direction's state (its count says whether this is the first step)
    step: Any        # the learning rate's schedule state for the step
    decay: Any       # the decay chain's state (weight decay, then the learning rate)


def soap(learning_rate: optax.ScalarOrSchedule, b1: float = 0.95, b2: float = 0.95,
         eps: float = 1e-8, weight_decay: float = 0.01, precondition_every: int = 10,
         max_precond_dim: int = 10000, shampoo_b2: Optional[float] = None,
         mask: MaskOrFn = None,
         weight_decay_mode: str = "lr_scaled") -> optax.GradientTransformationExtraArgs:
    """SOAP (Vyas et al. 2024) as released, with decoupled weight decay after the step.

    The direction D is `scale_by_soap`'s (see there for the update rule and the released
    code it follows). As in that code, the parameters first take the step and then decay:

        W <- (W - lr * D) * (1 - lr * weight_decay)    (leaves chosen by `mask`; None: all)

    and the first gradient changes nothing (no step, no decay). Official defaults: lr 3e-3
    in the paper's code; b1 = b2 = 0.95, eps 1e-8, weight_decay 0.01, precondition_every 10,
    max_precond_dim 10000.

    Args:
      learning_rate: a float or a schedule `step -> lr` (evaluated from step 0).
      b1, b2, eps, precondition_every, max_precond_dim, shampoo_b2: see `scale_by_soap`.
      weight_decay: decoupled decay, multiplied by the learning rate, applied to the
        parameters after the step.
      mask: which leaves get weight decay (a pytree of bools or a callable).
      weight_decay_mode: "lr_scaled" (`w -= lr_t * wd * w`) or "independent"
        (`w -= s_t * wd * w`, s_t = lr_t / peak lr); see `optim.decay_and_scale`.

    Returns:
      An `optax.GradientTransformationExtraArgs`.

    Example:
      >>> from ravine import optim
      >>> tx = soap(3e-3, weight_decay=0.01, mask=optim.decay_mask)
    """
    direction = scale_by_soap(b1, b2, eps, precondition_every, max_precond_dim, shampoo_b2)
    step = scale_by_learning_rate(learning_rate)
    decay = decay_and_scale(learning_rate, weight_decay, mask, weight_decay_mode)

    def init_fn(params):
        return SoapWithDecayState(direction.init(params), step.init(params), decay.init(params))

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args  # accepted and ignored, as optax's chains do
        directions, soap_state = direction.update(updates, state.soap, params)
        steps, step_state = step.update(directions, state.step, params)
        if params is not None:  # -lr * (D + wd * (W - lr * D)): the decay of the moved W
            params = optax.apply_updates(params, steps)
        updates, decay_state = decay.update(directions, state.decay, params)
        first = state.soap.count == 0
        updates = jax.tree.map(lambda u: jnp.where(first, jnp.zeros_like(u), u), updates)
        return updates, SoapWithDecayState(soap_state, step_state, decay_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
