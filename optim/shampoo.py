"""Shampoo: Kronecker-factored preconditioning per block, with grafting.

Gupta, Koren & Singer 2018, "Shampoo: Preconditioned Stochastic Tensor Optimization";
Anil et al. 2020, "Scalable Second Order Optimization for Deep Learning" (blocking, grafting,
coupled Newton roots, relative damping); Shi et al. 2023, "A Distributed Data-Parallel
PyTorch Implementation of the Distributed Shampoo Optimizer" (Adam grafting, momentum on the
grafted direction).
"""
import functools
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax
from jax import lax

from ravine.optim import _blocks, _validate
from ravine.optim.alias import MaskOrFn, decay_and_scale

GRAFTINGS = ("adam", "rmsprop", "sgd", None)


class ShampooBlocks(NamedTuple):
    """Per preconditioned leaf: one statistic and one inverse root per dim, for every block.

    `stats[j]` and `roots[j]` have shape `(*grid, b_j, b_j)` (see `optim._blocks`): the block
    grid leads, so these arrays can be sharded like the param's dims.
    """
    stats: tuple
    roots: tuple
    FOLLOWS_PARAM_GRID = True  # class attribute, not a field: see optim._blocks


class ShampooState(NamedTuple):
    count: jax.Array  # int32: steps taken (it alone decides when roots are refreshed)
    momentum: Any     # like params: EMA of the directions; None when b1 == 0
    diagonal: Any     # per leaf: grafting second moment (params' shape), or None
    blocks: Any       # per leaf: ShampooBlocks, or None for leaves it does not precondition


def _is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _new_weight(decay):
    """Weight of a new term in the accumulators: `1 - decay`, or 1 for plain sums (decay 1).

    `decay` may be an array (`optax.inject_hyperparams`), so the choice is made by value."""
    if _is_number(decay):
        return 1.0 if decay == 1 else 1.0 - decay
    return jnp.where(decay == 1, 1.0, 1.0 - decay)


def _debias(decay, count):
    """`1 - decay^count`, or 1 for plain sums (decay 1), as float32."""
    if _is_number(decay) and decay == 1:
        return jnp.float32(1)
    debiased = 1 - jnp.asarray(decay, jnp.float32) ** count.astype(jnp.float32)
    return debiased if _is_number(decay) else jnp.where(decay == 1, 1.0, debiased)



def scale_by_shampoo(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-6,
                     relative_eps: bool = True, block_size: int = 1024,
                     precondition_every: int = 10, start_preconditioning_step: int = 10,
                     grafting: Optional[str] = "adam", inverse_root: str = "eigh",
                     statistics_dtype: Any = jnp.float32, nesterov: bool = False,
                     graft_eps: float = 1e-8,
                     newton_precision: str = "float32") -> optax.GradientTransformation:
    """Shampoo's direction (Gupta et al. 2018) with blocking and grafting (Anil et al. 2020).

    Every leaf with ndim k >= 2 is cut into blocks of at most `block_size` per dim (see
    `optim._blocks`). For each block G and each dim j, with G_(j) its mode-j unfolding:

        S_j <- b2 S_j + (1 - b2) G_(j) G_(j)^T      (b2 = 1: S_j <- S_j + G_(j) G_(j)^T)
        P_j  = (S_j + d_j I)^(-1/(2k))               at steps t with t % precondition_every == 0
        D    = G x_0 P_0 x_1 ... x_{k-1} P_{k-1}     (matrix: P_0 G P_1, P = (.)^(-1/4))

    with damping `d_j = eps * lambda_max(S_j)` (`relative_eps`) or `eps`. A root that comes
    out non-finite keeps the previous one (initially the identity). Grafting: each block of D
    is rescaled to the norm of the same block of the grafting step A
    (`D * |A_block| / |D_block|`), where A is
      "adam":    g / (sqrt(v / (1 - b2^t)) + graft_eps),   v <- b2 v + (1 - b2) g^2
      "rmsprop": g / sqrt(v + graft_eps)
      "sgd":     g
    and None keeps Shampoo's own norms. Before `start_preconditioning_step`, and for leaves
    that are not preconditioned (scalars, 1-D), the direction is A itself (Adam's when
    `grafting` is None). Finally momentum on the direction:

        m <- b1 m + (1 - b1) D,   update = m / (1 - b1^t)
        (Nesterov: b1 m / (1 - b1^(t+1)) + (1 - b1) D / (1 - b1^t))

    Differences from distributed Shampoo (Anil et al. 2020; google-research/precondition's
    `distributed_shampoo`; issue 13 found the two equal up to rounding with these aligned):
      - statistics start at zero, not at eps * I; the damping is added only when a root is
        taken (relative to lambda_max, as its `relative_matrix_epsilon`), so it never
        lingers in statistics that decay with b2;
      - grafting rescales each block to the grafting step's norm on that block, not the
        whole layer: with blocks, layer-wise norms let one block's scale set another's;
      - "adam" grafting is Adam's diagonal step with v's bias correction (its RMSProp
        grafting has none, so early steps are too small by sqrt(1 - b2^t)); "rmsprop" puts
        graft_eps inside the root;
      - one momentum, an EMA with bias correction on the chosen direction (grafting step
        before `start_preconditioning_step`, Shampoo's after); it keeps two heavy-ball
        sums (`m <- b1 m + D`, no correction), one per direction, and defaults to Nesterov;
      - roots by eigh by default (its coupled Newton is `inverse_root="newton"`), computed
        in float32 (it uses float64 where enabled).

    Statistics live in `statistics_dtype`; roots are computed and stored in float32. The
    statistics' and the preconditioning's products take JAX's default matmul precision
    (TF32 on recent GPUs, one bfloat16 pass on TPU: the statistics of a rounded gradient,
    still PSD; `jax.default_matmul_precision` changes it); the roots' own products are
    float32 (or `newton_precision`). Roots of same-shape blocks (across leaves) are computed
    in one batched call, inside a `lax.cond` so steps that do not refresh them do not pay
    for them. Everything (including the step count that schedules the refreshes) is in the
    state, so a restored state resumes exactly.

    Args:
      b1: momentum on the (grafted) direction, in [0, 1); 0 keeps no momentum state.
      b2: decay of the statistics and of the grafting second moment, in (0, 1].
      eps: damping added to each statistic before its root.
      relative_eps: damping `eps * lambda_max` (robust to the statistics' scale) instead of eps.
      block_size: largest block extent along any dim.
      precondition_every: roots are recomputed at steps t with t % precondition_every == 0,
        after adding that step's statistics.
      start_preconditioning_step: first step t that uses Shampoo's direction.
      grafting: "adam", "rmsprop", "sgd" or None.
      inverse_root: "eigh" (symmetric eigendecomposition) or "newton" (coupled Newton,
        matmul-only: usually faster on GPU/TPU, slower on CPU).
      statistics_dtype: dtype of the statistics (e.g. jnp.bfloat16 to halve their memory).
      nesterov: Nesterov momentum.
      graft_eps: eps of the grafting step.
      newton_precision: how the "newton" roots multiply (`optim._blocks.matmul`): "float32"
        (HIGHEST), or "bfloat16_6x", each product a sum of six bfloat16 products with
        float32 accumulation, as accurate and meant for matrix units (GPU tensor cores, TPU
        MXUs) that run bfloat16 far faster than float32. On CPU it only costs time.
    """
    block_size, start_preconditioning_step = _blocks.static_values(
        block_size=block_size, start_preconditioning_step=start_preconditioning_step,
        statistics_dtype=statistics_dtype)
    _validate.in_range("b1", b1)
    _validate.greater_than("b2", b2, 0)
    _validate.in_range("b2", b2, high_inclusive=True)
    statistics_dtype = _validate.floating_dtype("statistics_dtype", statistics_dtype)
    _validate.non_negative("eps", eps)
    _validate.positive_int("block_size", block_size)
    _validate.positive_int("precondition_every", precondition_every)
    _validate.non_negative_int("start_preconditioning_step", start_preconditioning_step)
    _validate.one_of("grafting", grafting, GRAFTINGS)
    _validate.one_of("inverse_root", inverse_root, tuple(_blocks.INVERSE_ROOTS))
    _validate.non_negative("graft_eps", graft_eps)
    _validate.one_of("newton_precision", newton_precision, _blocks.PRODUCT_PRECISIONS)
    if inverse_root != "newton" and newton_precision != "float32":
        raise ValueError(f"newton_precision={newton_precision!r} needs inverse_root='newton', "
                         f"got inverse_root={inverse_root!r}")
    # The diagonal step used for grafting norms and wherever Shampoo does not precondition.
    diagonal = "adam" if grafting is None else grafting
    compute_roots = _blocks.INVERSE_ROOTS[inverse_root]
    if inverse_root == "newton":
        compute_roots = functools.partial(compute_roots, precision=newton_precision)

    def preconditioned(param):
        return param.ndim >= 2

    def needs_diagonal(param):
        if diagonal == "sgd":
            return False
        return not preconditioned(param) or grafting is not None or start_preconditioning_step > 0

    def init_blocks(param):
        if not preconditioned(param):
            return None
        blocking = _blocks.make_blocking(param.shape, block_size)
        shapes = [blocking.grid + (b, b) for b in blocking.block]
        return ShampooBlocks(
            stats=tuple(jnp.zeros(s, statistics_dtype) for s in shapes),
            roots=tuple(_blocks.eye_like(s) for s in shapes))

    def init_diagonal(wrapped):
        param = _blocks.unwrap(wrapped)
        if not needs_diagonal(param):
            return None
        return _blocks.wrap_like(wrapped, jnp.zeros_like(param))

    def init_fn(params):
        _blocks.reject_complex(params, "scale_by_shampoo")
        # Per-leaf values go where the params are, not inside Flax's param wrappers (nnx
        # variables, linen boxes): see optim._blocks.
        leaves, layout = _blocks.wrapped_leaves(params)
        return ShampooState(
            count=jnp.zeros([], jnp.int32),
            # Only a Python 0 drops the momentum (an injected b1 is an array).
            momentum=None if _is_number(b1) and b1 == 0 else optax.tree.zeros_like(params),
            diagonal=layout.unflatten([init_diagonal(p) for p in leaves]),
            blocks=layout.unflatten([init_blocks(_blocks.unwrap(p)) for p in leaves]))

    def diagonal_step(grad, v, count):
        """The diagonal (grafting) step and the new second moment (None where not needed)."""
        if diagonal == "sgd":
            return grad, v
        if v is None:
            return None, None
        v = (_new_weight(b2) * jnp.square(grad) + b2 * v).astype(v.dtype)
        if diagonal == "rmsprop":
            return grad * lax.rsqrt(v + graft_eps), v
        return grad / (jnp.sqrt(v / _debias(b2, count)) + graft_eps), v

    def refresh_roots(all_stats, all_roots):
        """New roots for every block of every leaf; same-shape stacks in one batched call."""
        pairs = [(s, r) for stats, roots in zip(all_stats, all_roots)
                 for s, r in zip(stats, roots)]
        # Order-k blocks take the -1/(2k) root: k is the number of grid dims.
        keys = [(s.shape, len(s.shape) - 2) for s, _ in pairs]

        def roots_of(key, stats, old):
            _, order = key
            new = compute_roots(stats, 2 * order, eps, relative_eps)
            return _blocks.keep_finite(new, old)

        flat = iter(_blocks.map_stacked(roots_of, pairs, keys))
        return [tuple(next(flat) for _ in roots) for roots in all_roots]

    def update_fn(updates, state, params=None):
        del params
        count = state.count
        new_count = optax.safe_increment(count)
        grads, treedef = jax.tree.flatten(updates)
        wrapped, layout = _blocks.wrapped_leaves(updates)
        diagonals = [_blocks.unwrap(v) for v in layout.flatten_up_to(state.diagonal)]
        blocks = layout.flatten_up_to(state.blocks)

        diag_steps, new_diagonals = [], []
        for grad, v in zip(grads, diagonals):
            step, v = diagonal_step(grad.astype(jnp.float32), v, new_count)
            diag_steps.append(step)
            new_diagonals.append(v)

        # Statistics of this step, then (maybe) roots, for the preconditioned leaves.
        indices = [i for i, b in enumerate(blocks) if b is not None]
        blockings = {i: _blocks.make_blocking(grads[i].shape, block_size) for i in indices}
        blocked = {i: _blocks.to_blocks(grads[i].astype(jnp.float32), blockings[i])
                   for i in indices}
        stats = []
        for i in indices:
            k = grads[i].ndim
            g = blocked[i].astype(statistics_dtype)
            stats.append(tuple(
                (_new_weight(b2) * _blocks.gram(g, j, k, jnp.float32)
                 + b2 * s.astype(jnp.float32)).astype(statistics_dtype)
                for j, s in enumerate(blocks[i].stats)))
        old_roots = [blocks[i].roots for i in indices]
        roots = lax.cond(count % precondition_every == 0, refresh_roots,
                         lambda _, r: r, stats, old_roots) if indices else []

        directions = list(diag_steps)
        use_shampoo = count >= start_preconditioning_step
        for i, leaf_roots in zip(indices, roots):
            k = grads[i].ndim
            # Roots are symmetric, so this is P_0 G P_1; the transposed form is the faster.
            direction = _blocks.multiply_dims(blocked[i], leaf_roots, k, transpose=True)
            if grafting is not None:
                graft = _blocks.to_blocks(diag_steps[i], blockings[i])
                norm = _blocks.block_norms(direction, k)
                direction = direction * (_blocks.block_norms(graft, k)
                                         / jnp.where(norm > 0, norm, 1))
            direction = _blocks.from_blocks(direction, blockings[i])
            directions[i] = (direction if start_preconditioning_step == 0
                             else jnp.where(use_shampoo, direction, diag_steps[i]))

        new_blocks = list(blocks)
        for i, s, r in zip(indices, stats, roots):
            new_blocks[i] = ShampooBlocks(s, tuple(r))

        if state.momentum is None:
            momentum, outputs = None, directions
        else:
            old = treedef.flatten_up_to(state.momentum)
            new = [(b1 * m + (1 - b1) * d).astype(m.dtype) for m, d in zip(old, directions)]
            outputs = [m / _debias(b1, new_count) for m in new]
            if nesterov:
                outputs = [b1 * m / _debias(b1, new_count + 1) + (1 - b1) * d
                           / _debias(b1, new_count) for m, d in zip(new, directions)]
            momentum = treedef.unflatten(new)

        outputs = [u.astype(g.dtype) for u, g in zip(outputs, grads)]
        new_state = ShampooState(
            count=new_count, momentum=momentum,
            diagonal=layout.unflatten([None if v is None else _blocks.wrap_like(w, v)
                                       for w, v in zip(wrapped, new_diagonals)]),
            blocks=layout.unflatten(new_blocks))
        return treedef.unflatten(outputs), new_state

    return optax.GradientTransformation(init_fn, update_fn)


def shampoo(learning_rate: optax.ScalarOrSchedule, b1: float = 0.9, b2: float = 0.999,
            eps: float = 1e-6, relative_eps: bool = True, weight_decay: float = 0.0,
            block_size: int = 1024, precondition_every: int = 10,
            start_preconditioning_step: int = 10, grafting: Optional[str] = "adam",
            inverse_root: str = "eigh", statistics_dtype: Any = jnp.float32,
            nesterov: bool = False, mask: MaskOrFn = None, graft_eps: float = 1e-8,
            newton_precision: str = "float32",
            weight_decay_mode: str = "lr_scaled") -> optax.GradientTransformation:
    """Shampoo with grafting, momentum and decoupled weight decay.

    Step `-lr * (shampoo_direction + weight_decay * params)`, the direction from
    `scale_by_shampoo` (see there for the update rule and the papers: Gupta et al. 2018,
    Anil et al. 2020, Shi et al. 2023). `mask` chooses the leaves that get weight decay
    (None: all); `weight_decay_mode="independent"` makes the decay `s_t * weight_decay *
    params` with s_t = lr_t / peak lr (see `optim.decay_and_scale`). With the default "adam"
    grafting, learning rates tuned for Adam are a good start.
    """
    return optax.chain(
        scale_by_shampoo(b1, b2, eps, relative_eps, block_size, precondition_every,
                         start_preconditioning_step, grafting, inverse_root,
                         statistics_dtype, nesterov, graft_eps, newton_precision),
        decay_and_scale(learning_rate, weight_decay, mask, weight_decay_mode))
