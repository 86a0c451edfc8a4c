"""Muon: momentum orthogonalized by Newton–Schulz, for the hidden matrices of a network.

Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks"
(https://kellerjordan.github.io/posts/muon/); Liu et al. 2025, "Muon is Scalable for LLM
Training" (https://arxiv.org/abs/2502.16982).
"""
import collections
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optim import _validate
from optim.alias import add_decoupled_weight_decay, scale_by_learning_rate
from optim.transforms import scale_by_adam

# Keller Jordan's quintic coefficients: they maximize the slope at 0, so small singular values
# grow fast, at the price of converging to [~0.7, ~1.2] instead of exactly 1.
NS_COEFFS = (3.4445, -4.7750, 2.0315)
NS_DTYPES = ("float32", "bfloat16", "float16", "float64")


def orthogonalize(x, ns_steps=5, eps=1e-8, dtype=jnp.float32):
    """Approximates U V^T for x = U S V^T with quintic Newton–Schulz iterations.

        X_0 = x / (|x|_F + eps),   A = X X^T,   X <- a X + (b A + c A^2) X,
        (a, b, c) = (3.4445, -4.7750, 2.0315),

    each map sending a singular value s to a s + b s^3 + c s^5. The result has the singular
    vectors of x and singular values in roughly [0.7, 1.2] (Jordan et al. 2024).

    Args:
      x: array of shape (..., rows, cols); leading axes are a batch of matrices, all
        orthogonalized in the same matmuls. Tall matrices are transposed so that X X^T is
        the smaller Gram matrix.
      ns_steps: number of iterations.
      eps: added to the Frobenius norm, so that a zero matrix stays zero.
      dtype: dtype of the iterations (bfloat16 halves the cost on accelerators); the
        normalization is done in float32 and the result has x's dtype.
    """
    transpose = x.shape[-2] > x.shape[-1]
    y = jnp.swapaxes(x, -1, -2) if transpose else x
    y = y.astype(jnp.promote_types(y.dtype, jnp.float32))
    y = y / (jnp.linalg.norm(y, axis=(-2, -1), keepdims=True) + eps)
    y = y.astype(dtype)
    a, b, c = NS_COEFFS
    for _ in range(ns_steps):
        gram = y @ jnp.swapaxes(y, -1, -2)
        y = a * y + (b * gram + c * gram @ gram) @ y
    y = jnp.swapaxes(y, -1, -2) if transpose else y
    return y.astype(x.dtype)


def _orthogonalize_stacked(matrices, **kwargs):
    """`orthogonalize` on every leaf, one batched call per (shape, dtype).

    Under GSPMD a separate small Newton–Schulz per matrix is several times slower than one
    stacked call, whose stack axis the partitioner can spread over devices.
    """
    leaves, treedef = jax.tree.flatten(matrices)
    groups = collections.defaultdict(list)
    for index, leaf in enumerate(leaves):
        groups[leaf.shape, leaf.dtype].append(index)
    result = [None] * len(leaves)
    for indices in groups.values():
        stacked = orthogonalize(jnp.stack([leaves[i] for i in indices]), **kwargs)
        for position, index in enumerate(indices):
            result[index] = stacked[position]
    return jax.tree.unflatten(treedef, result)


class MuonState(NamedTuple):
    """Momentum buffer `m` (same tree, shapes, dtypes and shardings as the params)."""

    momentum: Any


def scale_by_muon(momentum=0.95, nesterov=True, ns_steps=5, eps=1e-8, ns_dtype=jnp.float32):
    """Muon's direction for a tree of 2-D leaves (Jordan et al. 2024).

        m <- momentum * m + g
        d  = g + momentum * m   (nesterov)   or   d = m
        u  = orthogonalize(d) * sqrt(max(1, rows / cols))

    `orthogonalize` runs `ns_steps` quintic Newton–Schulz iterations on d / |d|_F (see
    `orthogonalize`); the Frobenius normalization makes the scale of the momentum
    irrelevant, so the undamped sum above and the EMA form of the reference code give the
    same update. Same-shape matrices are stacked and orthogonalized in one call.

    `rows` and `cols` are the leaf's axes 0 and 1. Jordan's PyTorch code stores weights as
    (out, in), so there the factor is sqrt(max(1, fan_out / fan_in)); for a Flax kernel,
    stored (in, out), this rule gives sqrt(max(1, fan_in / fan_out)) instead
    (`optax.contrib.muon` uses fan_out / fan_in with axis 0 as fan_in).

    Args:
      momentum: momentum decay, in [0, 1).
      nesterov: use the Nesterov direction `g + momentum * m`.
      ns_steps: Newton–Schulz iterations (positive int).
      eps: added to the Frobenius norm before dividing.
      ns_dtype: dtype of the Newton–Schulz matmuls: float32 (default), or bfloat16 on
        GPU/TPU, where the iteration is matmul-bound and tolerates bf16.

    Returns:
      An `optax.GradientTransformation`; `init` raises ValueError for a leaf that is not 2-D.
    """
    _validate.in_range("momentum", momentum)
    _validate.positive_int("ns_steps", ns_steps)
    _validate.non_negative("eps", eps)
    ns_dtype = _validate.floating_dtype("ns_dtype", ns_dtype, NS_DTYPES)

    def init_fn(params):
        for path, leaf in jax.tree.leaves_with_path(params):
            if jnp.ndim(leaf) != 2:
                raise ValueError(
                    f"scale_by_muon needs 2-D leaves, got shape {jnp.shape(leaf)} at "
                    f"{jax.tree_util.keystr(path)}; route it elsewhere with muon_mask")
        return MuonState(momentum=optax.tree.zeros_like(params))

    def update_fn(updates, state, params=None):
        del params
        new_momentum = jax.tree.map(lambda m, g: momentum * m + g, state.momentum, updates)
        if nesterov:
            direction = jax.tree.map(lambda m, g: g + momentum * m, new_momentum, updates)
        else:
            direction = new_momentum
        orthogonal = _orthogonalize_stacked(direction, ns_steps=ns_steps, eps=eps,
                                            dtype=ns_dtype)
        updates = jax.tree.map(lambda u: u * max(1.0, u.shape[0] / u.shape[1]) ** 0.5,
                               orthogonal)
        return updates, MuonState(momentum=new_momentum)

    return optax.GradientTransformation(init_fn, update_fn)


def hidden_matrices(exclude=()):
    """A `muon_mask`: True for 2-D leaves none of whose path keys is in `exclude`.

    Embeddings and the output head are 2-D but belong on AdamW (Jordan et al. 2024):
    `muon(lr, muon_mask=hidden_matrices(exclude=("embed", "lm_head")))` routes every leaf
    under a key named "embed" or "lm_head" (e.g. params["lm_head"]["kernel"]) to AdamW.
    """
    exclude = frozenset([exclude] if isinstance(exclude, str) else exclude)

    def mask(params):
        def is_hidden_matrix(path, leaf):
            keys = {getattr(k, "key", getattr(k, "name", None)) for k in path}  # dict / attr
            return jnp.ndim(leaf) == 2 and not keys & exclude

        return jax.tree.map_with_path(is_hidden_matrix, params)

    return mask


def muon(learning_rate, momentum=0.95, nesterov=True, ns_steps=5, weight_decay=0.0,
         adam_learning_rate=None, adam_b1=0.9, adam_b2=0.95, muon_mask=None, *,
         eps=1e-8, adam_eps=1e-8, mask=None, ns_dtype=jnp.float32):
    """Muon on the matrices chosen by `muon_mask`, AdamW on every other leaf.

    For a leaf W with muon_mask True (2-D, shape rows x cols):

        W <- W - lr * (orthogonalize(nesterov momentum) * sqrt(max(1, rows/cols))
                       + weight_decay * W)

    (`scale_by_muon`), and for every other leaf

        W <- W - adam_lr * (adam(b1=adam_b1, b2=adam_b2, eps=adam_eps) + weight_decay * W).

    Routing. The default `muon_mask` (None) puts every 2-D leaf on Muon, including an
    embedding table and the LM head, which Jordan et al. 2024 keep on AdamW: pass
    `muon_mask=hidden_matrices(exclude=("embed", "lm_head"))` (your model's key names), or
    any pytree of bools / callable `params -> pytree of bools` (a prefix tree is fine).
    A leaf marked True that is not 2-D raises ValueError at `init`.

    Scale. Orthogonalized updates have RMS about 1/sqrt(max(rows, cols)), much smaller
    than Adam's, so Muon's learning rate is typically ~0.02 (Jordan) while the AdamW leaves
    want ~3e-4; set `adam_learning_rate`. Liu et al. 2025 instead rescale Muon to match
    AdamW's RMS and add weight decay, which matters for long runs.

    Args:
      learning_rate: Muon's learning rate, a float or a schedule `step -> lr`.
      momentum: Muon momentum, in [0, 1).
      nesterov: Nesterov momentum for Muon.
      ns_steps: Newton–Schulz iterations.
      weight_decay: decoupled weight decay for all leaves chosen by `mask`, multiplied by
        each leaf's learning rate (as `optax.adamw` and `optax.contrib.muon`).
      adam_learning_rate: learning rate of the AdamW leaves; None means `learning_rate`.
      adam_b1, adam_b2: Adam's moment decays, in [0, 1).
      muon_mask: which leaves get Muon (see Routing); None means every 2-D leaf.
      eps: added to the Frobenius norm before Newton–Schulz.
      adam_eps: Adam's epsilon.
      mask: which leaves get weight decay (None: all), as in every optimizer here.
      ns_dtype: dtype of the Newton–Schulz matmuls; bfloat16 is the fast choice on GPU/TPU.

    Returns:
      An `optax.GradientTransformation`.
    """
    _validate.learning_rate(learning_rate)
    if adam_learning_rate is None:
        adam_learning_rate = learning_rate
    _validate.learning_rate(adam_learning_rate, "adam_learning_rate")
    _validate.in_range("adam_b1", adam_b1)
    _validate.in_range("adam_b2", adam_b2)
    _validate.non_negative("adam_eps", adam_eps)
    labels = _labels(muon_mask)
    return optax.chain(
        optax.partition({
            "muon": scale_by_muon(momentum, nesterov, ns_steps, eps, ns_dtype),
            "adam": scale_by_adam(b1=adam_b1, b2=adam_b2, eps=adam_eps),
        }, labels),
        add_decoupled_weight_decay(weight_decay, mask),
        optax.partition({
            "muon": scale_by_learning_rate(learning_rate),
            "adam": scale_by_learning_rate(adam_learning_rate),
        }, labels),
    )


def _labels(muon_mask):
    """`params -> tree of "muon"/"adam"` (possibly a prefix tree) from a muon_mask."""
    if muon_mask is None:
        muon_mask = hidden_matrices()

    def labels(params):
        chosen = muon_mask(params) if callable(muon_mask) else muon_mask
        return jax.tree.map(lambda is_muon: "muon" if is_muon else "adam", chosen)

    return labels

