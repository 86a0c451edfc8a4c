"""SOAP: Adam in the eigenbasis of Shampoo's preconditioner.

Vyas et al. 2024, "SOAP: Improving and Stabilizing Shampoo using Adam"
(https://arxiv.org/abs/2409.11321).
"""
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

from optim import _blocks, _validate
from optim.alias import add_decoupled_weight_decay, scale_by_learning_rate

HIGHEST = _blocks.HIGHEST


class SoapBases(NamedTuple):
    """Per preconditioned leaf and dim: Shampoo's statistic and its eigenbasis, `(d_j, d_j)`.

    Dims that are not preconditioned (above `max_precond_dim`) hold None: identity basis.
    """
    stats: tuple
    bases: tuple


class SoapState(NamedTuple):
    count: jax.Array  # int32: steps taken (it alone decides when bases are refreshed)
    mu: Any           # like params: Adam's first moment, in the current eigenbasis
    nu: Any           # like params: Adam's second moment, in the current eigenbasis
    bases: Any        # per leaf: SoapBases, or None for a leaf that is plain Adam


def _eigenbasis(stats):
    """Eigenvectors of symmetric matrices, columns by decreasing eigenvalue."""
    _, vectors = _blocks.per_matrix(jnp.linalg.eigh, stats)
    return vectors[..., ::-1]


def _power_step(stats, basis):
    """One power-iteration step from `basis` (SOAP's refresh): reorder its columns by the
    eigenvalue estimates `diag(Q^T S Q)`, decreasing, then `Q <- qr(S Q)`."""
    estimates = jnp.einsum("...ij,...ik,...kj->...j", basis, stats, basis, precision=HIGHEST)
    order = jnp.argsort(-estimates, axis=-1)
    basis = jnp.take_along_axis(basis, order[..., None, :], axis=-1)
    q, _ = _blocks.per_matrix(jnp.linalg.qr, jnp.matmul(stats, basis, precision=HIGHEST))
    return q


def scale_by_soap(b1=0.95, b2=0.95, eps=1e-8, precondition_every=10, max_precond_dim=10000,
                  shampoo_b2=None):
    """SOAP's direction (Vyas et al. 2024): Adam run in the eigenbasis of Shampoo's factors.

    For a leaf G with ndim >= 2, every dim j with `d_j <= max_precond_dim` keeps Shampoo's
    statistic S_j and an orthonormal basis Q_j of its eigenvectors (other dims, 1-D leaves and
    scalars use the identity, so a leaf without preconditioned dims is exactly Adam). At step t:

        G'   = G x_0 Q_0 ... x_{k-1} Q_{k-1}         (matrix: Q_0^T G Q_1)
        m <- b1 m + (1 - b1) G',   v <- b2 v + (1 - b2) G'^2
        update = back-rotation of  m^ / (sqrt(v^) + eps)   (m^, v^ bias-corrected as Adam)
        S_j <- c S_j + (1 - c) G_(j) G_(j)^T         (c = shampoo_b2, default b2)

    and when t % precondition_every == 0 the bases are refreshed from the S_j that include
    step t (eigh at t = 0, then one power step: sort Q_j's columns by diag(Q^T S Q),
    decreasing, then Q_j <- qr(S_j Q_j)), to be used from step t + 1. (A basis built from G
    itself would make G' nearly diagonal, and Adam's sign-like early steps would amplify the
    rounding noise off the diagonal; the paper's code skips the first step for this reason.)

    The moments live in the eigenbasis; when it changes from Q to Q', m is rotated exactly
    (`R m R^T` per dim, R = Q'^T Q) and v, a diagonal second moment, by the squared rotation
    (`v <- (R o R) v` per dim), which is exact when the basis is only permuted or re-signed.
    Bases of same-shape statistics (across leaves) are refreshed in one batched call, inside
    a `lax.cond` so other steps do not pay for them.

    Args:
      b1, b2: Adam's decay rates, in [0, 1).
      eps: Adam's eps, added to the root of the second moment.
      precondition_every: the eigenbases are refreshed every this many steps.
      max_precond_dim: dims larger than this keep the identity basis (no d x d matrices).
      shampoo_b2: decay of the statistics S_j, in [0, 1); None: b2.
    """
    _validate.in_range("b1", b1)
    _validate.in_range("b2", b2)
    _validate.non_negative("eps", eps)
    _validate.positive_int("precondition_every", precondition_every)
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
        return SoapState(count=jnp.zeros([], jnp.int32),
                         mu=optax.tree.zeros_like(params),
                         nu=optax.tree.zeros_like(params),
                         bases=jax.tree.map(init_bases, params))

    def refresh(count, all_stats, all_bases, mus, nus):
        """New bases (same-shape ones in one batched call), moments rotated into them."""
        pairs = [(s, q) for stats, bases in zip(all_stats, all_bases)
                 for s, q in zip(stats, bases) if s is not None]

        def new_basis(_, stats, basis):
            fresh = lax.cond(count == 0, lambda s, _: _eigenbasis(s), _power_step, stats, basis)
            return _blocks.keep_finite(fresh, basis)

        fresh = iter(_blocks.map_stacked(new_basis, pairs, [s.shape for s, _ in pairs]))
        new_bases, new_mus, new_nus = [], [], []
        for old_bases, mu, nu in zip(all_bases, mus, nus):
            bases = tuple(None if q is None else next(fresh) for q in old_bases)
            # R^T per dim, as multiply_dims wants it: old^T new.
            rotations = [None if q is None else jnp.matmul(old.T, q, precision=HIGHEST)
                         for old, q in zip(old_bases, bases)]
            new_bases.append(bases)
            new_mus.append(_blocks.multiply_dims(mu, rotations, 0))
            new_nus.append(_blocks.multiply_dims(
                nu, [None if r is None else jnp.square(r) for r in rotations], 0))
        return new_bases, new_mus, new_nus

    def update_fn(updates, state, params=None):
        del params
        count = state.count
        new_count = optax.safe_increment(count)
        grads, treedef = jax.tree.flatten(updates)
        leaf_bases = treedef.flatten_up_to(state.bases)
        c1 = 1 - jnp.float32(b1) ** new_count.astype(jnp.float32)
        c2 = 1 - jnp.float32(b2) ** new_count.astype(jnp.float32)

        # Adam in the current bases (the identity for leaves without any).
        directions, mus, nus = [], [], []
        for grad, mu, nu, leaf in zip(grads, treedef.flatten_up_to(state.mu),
                                      treedef.flatten_up_to(state.nu), leaf_bases):
            g = grad.astype(jnp.float32)
            if leaf is not None:
                g = _blocks.multiply_dims(g, leaf.bases, 0)
            mus.append((1 - b1) * g + b1 * mu.astype(jnp.float32))
            nus.append((1 - b2) * jnp.square(g) + b2 * nu.astype(jnp.float32))
            direction = (mus[-1] / c1) / (jnp.sqrt(nus[-1] / c2) + eps)
            if leaf is not None:
                direction = _blocks.multiply_dims(direction, leaf.bases, 0, transpose=True)
            directions.append(direction.astype(grad.dtype))

        # This step's statistics; on refresh steps new bases, with the moments rotated in.
        new_bases = list(leaf_bases)
        indices = [i for i, leaf in enumerate(leaf_bases) if leaf is not None]
        if indices:
            stats = [tuple(None if s is None else
                           (1 - stats_decay) * _blocks.gram(grads[i].astype(jnp.float32), j, 0)
                           + stats_decay * s for j, s in enumerate(leaf_bases[i].stats))
                     for i in indices]
            old = ([leaf_bases[i].bases for i in indices], [mus[i] for i in indices],
                   [nus[i] for i in indices])
            bases, rotated_mus, rotated_nus = lax.cond(
                count % precondition_every == 0,
                lambda *args: refresh(count, *args), lambda _, *rest: rest, stats, *old)
            for i, s, q, mu, nu in zip(indices, stats, bases, rotated_mus, rotated_nus):
                new_bases[i], mus[i], nus[i] = SoapBases(s, q), mu, nu

        state = SoapState(
            count=new_count,
            mu=optax.tree.cast_like(treedef.unflatten(mus), state.mu),
            nu=optax.tree.cast_like(treedef.unflatten(nus), state.nu),
            bases=treedef.unflatten(new_bases))
        return treedef.unflatten(directions), state

    return optax.GradientTransformation(init_fn, update_fn)


def soap(learning_rate, b1=0.95, b2=0.95, eps=1e-8, weight_decay=0.01, precondition_every=10,
         max_precond_dim=10000, shampoo_b2=None, mask=None):
    """SOAP (Vyas et al. 2024) with decoupled weight decay.

    Step `-lr * (soap_direction + weight_decay * params)`, the direction from `scale_by_soap`
    (Adam in the eigenbasis of Shampoo's factors; see there for the update rule). With every
    dim above `max_precond_dim` this is exactly `optax.adamw` (masked like it by `mask`).
    """
    return optax.chain(
        scale_by_soap(b1, b2, eps, precondition_every, max_precond_dim, shampoo_b2),
        add_decoupled_weight_decay(weight_decay, mask),
        scale_by_learning_rate(learning_rate))
