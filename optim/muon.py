"""Muon: momentum orthogonalized by Newton–Schulz, for the hidden matrices of a network.

Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks"
(https://kellerjordan.github.io/posts/muon/); Liu et al. 2025, "Muon is Scalable for LLM
Training" (https://arxiv.org/abs/2502.16982).

Layout. A weight is orthogonalized as the matrix of the linear map it applies: its
"reduction" axes (contracted with the input) flattened into rows, its "output" axes into
columns, every other axis a batch of independent matrices. This is `optax.contrib.muon`'s
`MuonDimensionNumbers`, reused here. Flax kernels are stored (fan_in, fan_out), so the default
for a 2-D leaf is reduction axis 0, output axis 1 (`FLAX_LAYOUT`); a PyTorch weight, stored
(fan_out, fan_in), is `TORCH_LAYOUT`.
"""
import collections
import math
from typing import Any, Callable, NamedTuple, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax

from ravine.optim import _blocks, _validate
from ravine.optim.alias import (MaskOrFn, add_decoupled_weight_decay, decay_per_unit_lr,
                                scale_by_learning_rate)
from ravine.optim.transforms import scale_by_adam

# Keller Jordan's quintic coefficients: they maximize the slope at 0, so small singular values
# grow fast, at the price of converging to [~0.7, ~1.2] instead of exactly 1.
NS_COEFFS = (3.4445, -4.7750, 2.0315)
# `optax.contrib.muon`'s presets for `ns_coeffs`: "standard" (the above) and "dion", one row per
# iteration (Ahn et al. 2025, "Dion: Distributed Orthonormalized Updates").
NS_COEFFS_PRESETS = {
    "standard": NS_COEFFS,
    "dion": ((4.0848, -6.8946, 2.9270), (3.9505, -6.3029, 2.6377), (3.7418, -5.5913, 2.3037),
             (2.8769, -3.1427, 1.2046), (2.8366, -3.0525, 1.2012)),
}
# How the matrix is scaled before (or in) the first iteration, as `optax.contrib.muon`.
PRECONDITIONINGS = ("frobenius", "spectral", "aol", "schatten")
NS_DTYPES = ("float32", "bfloat16", "float16", "float64")
# Type of `ns_coeffs`: (a, b, c), one row per iteration, or (not for `orthogonalize`) a preset.
NsCoeffs = Union[str, Sequence[float], Sequence[Sequence[float]]]

MuonDimensionNumbers = optax.contrib.MuonDimensionNumbers
FLAX_LAYOUT = MuonDimensionNumbers(reduction_axis=0, output_axis=1)   # (fan_in, fan_out)
TORCH_LAYOUT = MuonDimensionNumbers(reduction_axis=1, output_axis=0)  # (fan_out, fan_in)
# ravine's attention (models/transformer.py): query/key/value kernels map d_model to
# (heads, head_dim), the output kernel maps (heads, head_dim) back to d_model.
ATTENTION_IN_LAYOUT = MuonDimensionNumbers(reduction_axis=0, output_axis=(1, 2))
ATTENTION_OUT_LAYOUT = MuonDimensionNumbers(reduction_axis=(0, 1), output_axis=2)
ATTENTION_IN_KEYS = ("query", "key", "value")
ATTENTION_OUT_KEYS = ("out",)
# Path keys of leaves that `hidden_matrices` keeps on AdamW by default: ravine's token
# embedding ("embed", whose Flax param is "embedding"), learned position table and LM head.
DEFAULT_EXCLUDE = ("embed", "embedding", "position", "head", "lm_head")
# One `MuonDimensionNumbers` for all leaves, a pytree of them, or `params -> such a pytree`.
DimensionNumbersOrFn = Optional[Union[MuonDimensionNumbers, Any, Callable[[optax.Params], Any]]]


def _ns_loop(ns_steps, step, y):
    """`ns_steps` applications of `step`: unrolled for a Python int, a loop for an array
    (as `optax.inject_hyperparams` passes it)."""
    if isinstance(ns_steps, int):
        for _ in range(ns_steps):
            y = step(y)
        return y
    return lax.fori_loop(0, ns_steps, lambda _, x: step(x), y)


def _is_array(x):
    return isinstance(x, (jax.Array, np.ndarray, np.generic))


def _ns_coefficients(ns_coeffs=NS_COEFFS, ns_steps=5):
    """`ns_coeffs` checked, as `optax.contrib.muon` takes it: a preset name ("standard",
    "dion"), one (a, b, c) for every iteration, or a table of n rows (a_i, b_i, c_i), one per
    iteration (then the n rows are run and `ns_steps` must be at least n, as in optax).

    Returns the coefficients (a preset resolved to its tuple); ValueError naming the argument.
    """
    if isinstance(ns_coeffs, str):
        if ns_coeffs not in NS_COEFFS_PRESETS:
            raise ValueError(f"ns_coeffs must be one of {list(NS_COEFFS_PRESETS)} or "
                             f"coefficients, got {ns_coeffs!r}")
        ns_coeffs = NS_COEFFS_PRESETS[ns_coeffs]
    try:
        shape = np.shape(ns_coeffs)
    except (TypeError, ValueError):
        shape = None
    if shape is None or len(shape) not in (1, 2) or shape[-1] != 3:
        raise ValueError(f"ns_coeffs must have shape (3,) or (n, 3), got {ns_coeffs!r}")
    if (len(shape) == 2 and isinstance(ns_steps, (int, np.integer))
            and shape[0] > ns_steps):
        raise ValueError(f"ns_coeffs has {shape[0]} rows (one per iteration), more than "
                         f"ns_steps={ns_steps}")
    return ns_coeffs


def _first_iteration_scale(y, gram, preconditioning, eps):
    """AOL's and Schatten-4's rescaling of X and A = X X^H in the first iteration: X <- S X,
    A <- S A S with S = diag(1 / sqrt(sum_j |A_ij|)) (AOL, Boissin et al. 2025) or
    S = 1 / sqrt(|A|_F) (Schatten-4, Grishina et al. 2025), as `optax.contrib.muon`."""
    if preconditioning == "aol":
        s = lax.rsqrt(jnp.maximum(jnp.sum(jnp.abs(gram), axis=-1), eps))[..., None]
        return y * s, gram * s * jnp.swapaxes(s, -1, -2)
    s = lax.rsqrt(jnp.maximum(jnp.linalg.norm(gram, axis=(-2, -1), keepdims=True), eps))
    return y * s, gram * s * s


def orthogonalize(x: jax.Array, ns_steps: int = 5, eps: float = 1e-8, dtype: Any = jnp.float32,
                  ns_coeffs: NsCoeffs = NS_COEFFS,
                  preconditioning: str = "frobenius") -> jax.Array:
    """Approximates U V^H for x = U S V^H with quintic Newton–Schulz iterations.

        X_0 = x / (|x|_F + eps),   A = X X^H,   X <- a X + (b A + c A^2) X,
        (a, b, c) = (3.4445, -4.7750, 2.0315),

    each map sending a singular value s to a s + b s^3 + c s^5. The result has the singular
    vectors of x and singular values in roughly [0.7, 1.2] (Jordan et al. 2024).

    Args:
      x: array of shape (..., rows, cols); leading axes are a batch of matrices, all
        orthogonalized in the same matmuls. Tall matrices are transposed so that X X^H is
        the smaller Gram matrix (the iteration commutes with transposition). A complex x
        gives the unitary factor (iterations in its complex dtype).
      ns_steps: number of iterations (ignored for a table of `ns_coeffs` rows).
      eps: added to the norm, so that a zero matrix stays zero.
      dtype: dtype of the iterations (bfloat16 halves the cost on accelerators); the
        normalization is done in float32 and the result has x's dtype.
      ns_coeffs: (a, b, c) for every iteration, or n rows (a_i, b_i, c_i) run in turn
        (see `_ns_coefficients`).
      preconditioning: as `optax.contrib.muon`: "frobenius" (X_0 above), "spectral"
        (X_0 = x / (|x|_2 + eps), exact but an SVD), "aol" or "schatten" (x unscaled, the
        first iteration rescales it; see `_first_iteration_scale`).

    Returns:
      An array like x.
    """
    transpose = x.shape[-2] > x.shape[-1]
    y = jnp.swapaxes(x, -1, -2) if transpose else x
    y = y.astype(jnp.promote_types(y.dtype, jnp.float32))
    if preconditioning == "frobenius":
        y = y / (jnp.linalg.norm(y, axis=(-2, -1), keepdims=True) + eps)
    elif preconditioning == "spectral":
        y = y / (jnp.linalg.norm(y, ord=2, axis=(-2, -1), keepdims=True) + eps)
    elif preconditioning not in ("aol", "schatten"):
        raise ValueError(f"preconditioning must be one of {list(PRECONDITIONINGS)}, got "
                         f"{preconditioning!r}")
    y = y.astype(jnp.promote_types(dtype, y.dtype) if jnp.iscomplexobj(y) else dtype)

    def as_coefficient(value):  # Python numbers stay weak (bfloat16 iterations stay bf16)
        return value if isinstance(value, (int, float)) else jnp.asarray(value, y.dtype)

    def step(y, coeffs, first=False):
        a, b, c = (as_coefficient(coeffs[i]) for i in range(3))
        gram = y @ jnp.swapaxes(y, -1, -2).conj()
        if first and preconditioning in ("aol", "schatten"):
            y, gram = _first_iteration_scale(y, gram, preconditioning, eps)
        return a * y + (b * gram + c * gram @ gram) @ y

    if np.ndim(ns_coeffs) == 2:
        for i in range(np.shape(ns_coeffs)[0]):
            y = step(y, ns_coeffs[i], first=i == 0)
    elif preconditioning in ("aol", "schatten"):
        y = step(y, ns_coeffs, first=True)
        y = _ns_loop(ns_steps - 1, lambda y: step(y, ns_coeffs), y)
    else:
        y = _ns_loop(ns_steps, lambda y: step(y, ns_coeffs), y)
    y = jnp.swapaxes(y, -1, -2) if transpose else y
    return y.astype(x.dtype)


def _axes(axes, ndim):
    """An axis or axes of MuonDimensionNumbers as non-negative ints (None where out of range)."""
    axes = (axes,) if isinstance(axes, (int, np.integer)) else tuple(axes)
    return tuple(int(a) % ndim if -ndim <= a < ndim else None for a in axes)


class _MatrixView(NamedTuple):
    """How a leaf is seen as a batch of (fan_in, fan_out) matrices (static, from its shape)."""
    permutation: tuple  # batch axes, then reduction axes, then output axes
    permuted_shape: tuple
    fan_in: int
    fan_out: int

    @property
    def matrices_shape(self):
        batch = math.prod(self.permuted_shape) // (self.fan_in * self.fan_out)
        return (batch, self.fan_in, self.fan_out)

    def to_matrices(self, x):
        return jnp.transpose(x, self.permutation).reshape(self.matrices_shape)

    def from_matrices(self, x):
        return jnp.transpose(x.reshape(self.permuted_shape), np.argsort(self.permutation))

    @property
    def scale(self):
        """Jordan's shape factor for a map from fan_in to fan_out: sqrt(max(1, out / in))."""
        return max(1.0, self.fan_out / self.fan_in) ** 0.5


def _matrix_view(shape, dims, where):
    """The `_MatrixView` of a leaf of `shape` under MuonDimensionNumbers `dims`; ValueError
    naming the leaf (`where`) when they do not fit."""
    ndim = len(shape)
    if ndim < 2:
        raise ValueError(f"Muon needs leaves with at least 2 dims, got shape {tuple(shape)} at "
                         f"{where}; route it elsewhere with muon_mask")
    if not isinstance(dims, MuonDimensionNumbers):
        raise ValueError(f"dimension numbers at {where} must be a MuonDimensionNumbers, got "
                         f"{dims!r}")
    reduction, output = _axes(dims.reduction_axis, ndim), _axes(dims.output_axis, ndim)
    if (None in reduction + output or not reduction or not output
            or len(set(reduction + output)) != len(reduction + output)):
        raise ValueError(f"{dims} does not fit shape {tuple(shape)} at {where}: reduction and "
                         f"output axes must be non-empty, disjoint and within {ndim} dims")
    batch = tuple(a for a in range(ndim) if a not in reduction + output)
    permutation = batch + reduction + output
    return _MatrixView(permutation, tuple(shape[a] for a in permutation),
                       math.prod(shape[a] for a in reduction),
                       math.prod(shape[a] for a in output))


def _orthogonalize_grouped(matrices, **kwargs):
    """`orthogonalize` of every `(batch, m, n)` array, one call per (m, n, dtype).

    Under GSPMD a separate small Newton–Schulz per matrix is several times slower than one
    stacked call, whose stack axis the partitioner can spread over devices.
    """
    groups = collections.defaultdict(list)
    for index, x in enumerate(matrices):
        groups[x.shape[1:], x.dtype].append(index)
    result = [None] * len(matrices)
    for indices in groups.values():
        sizes = [matrices[i].shape[0] for i in indices]
        stacked = orthogonalize(jnp.concatenate([matrices[i] for i in indices]), **kwargs)
        for i, part in zip(indices, jnp.split(stacked, np.cumsum(sizes)[:-1])):
            result[i] = part
    return result


class MuonState(NamedTuple):
    """Momentum buffer `m` (same tree, shapes, dtypes and shardings as the params)."""

    momentum: Any


def scale_by_muon(momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
                  eps: float = 1e-8, ns_dtype: Any = jnp.float32,
                  dimension_numbers: DimensionNumbersOrFn = None, *,
                  ns_coeffs: NsCoeffs = NS_COEFFS, preconditioning: str = "frobenius",
                  adaptive: bool = False) -> optax.GradientTransformation:
    """Muon's direction (Jordan et al. 2024), each leaf orthogonalized as a linear map.

        m <- momentum * m + g
        d  = g + momentum * m   (nesterov)   or   d = m
        u  = orthogonalize(D) * sqrt(max(1, fan_out / fan_in)),

    D being d seen as a (fan_in, fan_out) matrix (or a batch of them) by the leaf's
    dimension numbers: reduction axes flattened into fan_in rows, output axes into fan_out
    columns, other axes a batch (as `optax.contrib.muon`). `orthogonalize` runs `ns_steps`
    quintic Newton–Schulz iterations on D / |D|_F; the Frobenius normalization makes the
    scale of the momentum irrelevant, so the undamped sum above and the EMA form of the
    reference code give the same update. Matrices of the same shape (across leaves) are
    orthogonalized in one batched call.

    Scale. Jordan's code multiplies by sqrt(max(1, rows / cols)) of a PyTorch weight, stored
    (fan_out, fan_in): sqrt(max(1, fan_out / fan_in)), which is what is applied here, with
    fan_in and fan_out taken from the dimension numbers (`optax.contrib.muon` does the same).
    With the default layout of a 2-D leaf, (fan_in, fan_out) as Flax stores kernels, an MLP's
    up-projection (d, 4d) gets 2 and its down-projection 1. Declare `TORCH_LAYOUT` for a
    weight stored (fan_out, fan_in).

    Adaptive (`adaptive=True`, as `optax.contrib.muon`; Bernstein & Newhouse 2024, "Old
    Optimizer, New Norm", https://arxiv.org/abs/2409.20325): u is further multiplied by
    the dual norm <(1 - momentum) d, orthogonalize(D)> of the leaf's direction, summed over
    the whole leaf. (1 - momentum) d is Jordan's EMA form of the direction; optax also
    divides it by its bias correction 1 - momentum^t, so the two agree for momentum=0 and
    after the first ~1 / (1 - momentum) steps.

    Args:
      momentum: momentum decay, in [0, 1).
      nesterov: use the Nesterov direction `g + momentum * m`.
      ns_steps: Newton–Schulz iterations (positive int).
      eps: added to the Frobenius norm before dividing.
      ns_dtype: dtype of the Newton–Schulz matmuls: float32 (default), or bfloat16 on
        GPU/TPU, where the iteration is matmul-bound and tolerates bf16. A 0-d array stands
        for its dtype: `optax.inject_hyperparams` takes a dtype class for a schedule and
        passes the array it returns (`jnp.bfloat16(step)`), whose dtype is the one given.
      dimension_numbers: None (every leaf is a 2-D (fan_in, fan_out) matrix), one
        `MuonDimensionNumbers` for every leaf, a pytree of them matching the params, or a
        callable `params -> such a pytree`.
      ns_coeffs: the Newton–Schulz coefficients (a, b, c), a table of rows, one per
        iteration, or a preset name ("standard", "dion"), as `optax.contrib.muon`.
      preconditioning: "frobenius" (default), "spectral", "aol" or "schatten": how the
        matrix is scaled before the iterations (see `orthogonalize`), as optax.
      adaptive: scale by the dual norm of the direction (see above).

    Returns:
      An `optax.GradientTransformation`; `init` raises ValueError naming the leaf for a leaf
      whose dimension numbers do not fit its shape and for a complex leaf.

    Example:
      >>> tx = optax.chain(scale_by_muon(dimension_numbers=TORCH_LAYOUT),
      ...                  optax.scale_by_learning_rate(0.02))
    """
    _validate.in_range("momentum", momentum)
    _validate.positive_int("ns_steps", ns_steps)
    _validate.non_negative("eps", eps)
    if _is_array(ns_dtype) and jnp.ndim(ns_dtype) == 0:
        ns_dtype = ns_dtype.dtype  # as optax.inject_hyperparams passes a dtype (see Args)
    ns_dtype = _validate.floating_dtype("ns_dtype", ns_dtype, NS_DTYPES)
    ns_coeffs = _ns_coefficients(ns_coeffs, ns_steps)
    _validate.one_of("preconditioning", preconditioning, PRECONDITIONINGS)

    def views(tree):
        """The `_MatrixView` of every leaf of `tree`, in flattening order."""
        if dimension_numbers is None or isinstance(dimension_numbers, MuonDimensionNumbers):
            dims = [dimension_numbers or FLAX_LAYOUT] * len(jax.tree.leaves(tree))
            if dimension_numbers is None:
                for path, leaf in jax.tree.leaves_with_path(tree):
                    if jnp.ndim(leaf) != 2:
                        raise ValueError(
                            f"scale_by_muon needs 2-D leaves or dimension_numbers, got shape "
                            f"{jnp.shape(leaf)} at {jax.tree_util.keystr(path)}")
        else:
            spec = dimension_numbers(tree) if callable(dimension_numbers) else dimension_numbers
            dims = jax.tree.structure(tree).flatten_up_to(spec)
        return [_matrix_view(jnp.shape(leaf), d, jax.tree_util.keystr(path))
                for (path, leaf), d in zip(jax.tree.leaves_with_path(tree), dims)]

    def init_fn(params):
        _blocks.reject_complex(params, "scale_by_muon")
        views(params)
        return MuonState(momentum=optax.tree.zeros_like(params))

    def update_fn(updates, state, params=None):
        del params
        new_momentum = jax.tree.map(lambda m, g: momentum * m + g, state.momentum, updates)
        if nesterov:
            direction = jax.tree.map(lambda m, g: g + momentum * m, new_momentum, updates)
        else:
            direction = new_momentum
        leaves, treedef = jax.tree.flatten(direction)
        leaf_views = views(direction)
        orthogonal = _orthogonalize_grouped(
            [view.to_matrices(d) for view, d in zip(leaf_views, leaves)],
            ns_steps=ns_steps, eps=eps, dtype=ns_dtype, ns_coeffs=ns_coeffs,
            preconditioning=preconditioning)
        orthogonal = [view.from_matrices(o) for view, o in zip(leaf_views, orthogonal)]
        if adaptive:  # <(1 - momentum) d, O> O: the dual norm of the direction (see above)
            orthogonal = [jnp.sum((1 - momentum) * d * o).astype(o.dtype) * o
                          for d, o in zip(leaves, orthogonal)]
        updates = [o * view.scale for view, o in zip(leaf_views, orthogonal)]
        return treedef.unflatten(updates), MuonState(momentum=new_momentum)

    return optax.GradientTransformation(init_fn, update_fn)


def _module_path(path):
    """The names of the dict keys on a leaf's path: its module path ("params", "block_0",
    "attn", "out", "kernel"). Attribute keys are left out: a box around the array
    (linen's `nn.Partitioned`, an `nnx.Param`) adds one, `.value`, that names no module."""
    return {str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)}


def hidden_matrices(exclude: Union[str, Sequence[str]] = DEFAULT_EXCLUDE,
                    layout: MuonDimensionNumbers = FLAX_LAYOUT
                    ) -> Callable[[optax.Params], Any]:
    """The default `muon_mask`: the hidden linear maps of a network, with their layouts.

    Returns a callable `params -> pytree` giving, per leaf, its `MuonDimensionNumbers` (Muon)
    or None (AdamW). Routing is decided by the leaf's module path, the dict keys on its path
    (an attribute of a box around the array, such as `nn.Partitioned.value`, is not part of
    it), and its shape. No leaf any of whose path keys is in `exclude` goes to Muon; otherwise
      - a 2-D leaf gets `layout` (default (fan_in, fan_out), Flax's kernels);
      - a 3-D leaf under a key in `ATTENTION_IN_KEYS` ("query", "key", "value") is a map from
        its axis 0 to axes (1, 2), and under `ATTENTION_OUT_KEYS` ("out") from axes (0, 1) to
        axis 2: ravine's attention kernels (d_model, heads, head_dim) and
        (heads, head_dim, d_model), orthogonalized as whole d_model x (heads * head_dim) maps;
      - every other leaf (1-D gains and biases, scalars, other 3-D and higher arrays: give
        those explicit dimension numbers) stays on AdamW.
    The default `exclude` keeps ravine's token embedding ("embed" / "embedding"), learned
    position table ("position") and LM head ("head", "lm_head") on AdamW (Jordan et al. 2024).
    To route the head to Muon too, pass an `exclude` without "head".
    """
    exclude = frozenset([exclude] if isinstance(exclude, str) else exclude)

    def dims(path, leaf):
        keys = _module_path(path)
        if keys & exclude:
            return None
        if jnp.ndim(leaf) == 2:
            return layout
        if jnp.ndim(leaf) == 3 and keys & set(ATTENTION_IN_KEYS):
            return ATTENTION_IN_LAYOUT
        if jnp.ndim(leaf) == 3 and keys & set(ATTENTION_OUT_KEYS):
            return ATTENTION_OUT_LAYOUT
        return None

    return lambda params: jax.tree.map_with_path(dims, params)


def muon(learning_rate: optax.ScalarOrSchedule, momentum: float = 0.95, nesterov: bool = True,
         ns_steps: int = 5, weight_decay: float = 0.0,
         adam_learning_rate: Optional[optax.ScalarOrSchedule] = None, adam_b1: float = 0.9,
         adam_b2: float = 0.95, muon_mask: MaskOrFn = None, *, eps: float = 1e-8,
         adam_eps: float = 1e-8, mask: MaskOrFn = None, ns_dtype: Any = jnp.float32,
         weight_decay_mode: str = "lr_scaled", ns_coeffs: NsCoeffs = NS_COEFFS,
         preconditioning: str = "frobenius", adaptive: bool = False,
         muon_weight_dimension_numbers: MaskOrFn = None) -> optax.GradientTransformation:
    """Muon on the linear maps chosen by `muon_mask`, AdamW on every other leaf.

    For a leaf W routed to Muon, seen as a (fan_in, fan_out) matrix (see `scale_by_muon`):

        W <- W - lr * (orthogonalize(nesterov momentum) * sqrt(max(1, fan_out / fan_in))
                       + weight_decay * W)

    and for every other leaf

        W <- W - adam_lr * (adam(b1=adam_b1, b2=adam_b2, eps=adam_eps) + weight_decay * W).

    Routing. `muon_mask` is a pytree (a prefix tree is fine) or a callable
    `params -> pytree` whose leaves are `MuonDimensionNumbers` (Muon, with that layout), True
    (Muon, for a 2-D leaf stored (fan_in, fan_out)), or False / None (AdamW). The default
    (None) is `hidden_matrices()`: 2-D kernels and ravine's 3-D attention kernels on Muon;
    the token embedding, position table, LM head and 1-D leaves on AdamW. A weight stored
    PyTorch-style (fan_out, fan_in) is declared with `TORCH_LAYOUT`, e.g.
    `muon_mask={"w": TORCH_LAYOUT, "b": False}`. A leaf marked True that is not 2-D, or whose
    dimension numbers do not fit it, raises ValueError naming it at `init`.

    Differences from the references. Jordan's Muon keeps an EMA of the gradients,
    `m <- b m + (1 - b) g`, and its Nesterov direction `(1 - b) g + b m`; the undamped sum
    here differs by the factor 1 - b, which the normalization removes. `optax.contrib.muon`
    bias-corrects its EMA, which makes its Nesterov direction a different mix of g and m
    (equal to ours without Nesterov). Weight decay is optax's (multiplied by the lr, on
    every leaf chosen by `mask`), where `optax.contrib.muon` decays its Adam leaves with a
    separate `adam_weight_decay`.

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
      weight_decay_mode: "lr_scaled" (decay times each leaf's learning rate) or
        "independent" (`s_t * weight_decay * W`, s_t = that learning rate / its peak; see
        `optim.decay_and_scale`).
      adam_b1, adam_b2: Adam's moment decays, in [0, 1).
      muon_mask: which leaves get Muon and as which matrices (see Routing).
      eps: added to the Frobenius norm before Newton–Schulz.
      adam_eps: Adam's epsilon.
      mask: which leaves get weight decay (None: all), as in every optimizer here.
      ns_dtype: dtype of the Newton–Schulz matmuls; bfloat16 is the fast choice on GPU/TPU.
      ns_coeffs, preconditioning, adaptive: optax's options, see `scale_by_muon`: the
        Newton–Schulz coefficients (or a preset, "standard" / "dion"), the scaling before
        the iterations ("frobenius", "spectral", "aol", "schatten"), and the dual-norm
        scaling of the update.
      muon_weight_dimension_numbers: `optax.contrib.muon`'s name for `muon_mask` (give one
        of the two). Without either, the default routing is `hidden_matrices()`, where
        optax's puts every 2-D leaf (embeddings and head too) on Muon.

    Returns:
      An `optax.GradientTransformation`.

    Example:
      >>> from ravine import optim
      >>> from ravine.optim.muon import muon
      >>> tx = muon(0.02, adam_learning_rate=3e-4, weight_decay=0.1,
      ...           mask=optim.decay_mask)
    """
    _validate.learning_rate(learning_rate)
    if adam_learning_rate is None:
        adam_learning_rate = learning_rate
    _validate.learning_rate(adam_learning_rate, "adam_learning_rate")
    _validate.in_range("adam_b1", adam_b1)
    _validate.in_range("adam_b2", adam_b2)
    _validate.non_negative("adam_eps", adam_eps)
    if muon_weight_dimension_numbers is not None:
        if muon_mask is not None:
            raise ValueError("give muon_mask or muon_weight_dimension_numbers (optax's name "
                             "for it), not both")
        muon_mask = muon_weight_dimension_numbers
    if muon_mask is None:
        muon_mask = hidden_matrices()
    routing = _Routing(muon_mask)
    inner = optax.chain(
        optax.partition({
            "muon": scale_by_muon(momentum, nesterov, ns_steps, eps, ns_dtype,
                                  dimension_numbers=routing.dimension_numbers,
                                  ns_coeffs=ns_coeffs, preconditioning=preconditioning,
                                  adaptive=adaptive),
            "adam": scale_by_adam(b1=adam_b1, b2=adam_b2, eps=adam_eps),
        }, routing.labels),
        _decay_by_route(weight_decay, mask, routing, learning_rate, adam_learning_rate,
                        weight_decay_mode),
        optax.partition({
            "muon": scale_by_learning_rate(learning_rate),
            "adam": scale_by_learning_rate(adam_learning_rate),
        }, routing.labels),
    )
    return optax.GradientTransformation(routing.checked(inner.init), inner.update)


def _decay_by_route(weight_decay, mask, routing, learning_rate, adam_learning_rate,
                    weight_decay_mode):
    """Decoupled decay before the two learning rates. "lr_scaled": `+ wd * W` on every
    decayed leaf. "independent": `+ (wd / peak) * W`, with the peak of the leaf's own
    learning rate (Muon's or AdamW's), so after scaling the decay is `s_t * wd * W`."""
    _validate.one_of("weight_decay_mode", weight_decay_mode, ("lr_scaled", "independent"))
    if weight_decay_mode == "lr_scaled":
        return add_decoupled_weight_decay(weight_decay, mask)
    muon_decay = decay_per_unit_lr(learning_rate, weight_decay, weight_decay_mode)
    adam_decay = decay_per_unit_lr(adam_learning_rate, weight_decay, weight_decay_mode)
    if not isinstance(mask, (type(None),)) and not callable(mask):
        fixed_mask = mask
        mask = lambda _: fixed_mask  # noqa: E731 - a pytree of bools, as optax takes it
    muon_leaves = lambda params: jax.tree.map(  # noqa: E731
        lambda label: label == "muon", routing.labels(params))

    def both(params, on_muon):
        decayed = mask(params) if mask is not None else jax.tree.map(lambda _: True, params)
        return jax.tree.map(lambda d, m: bool(d) and m == on_muon, decayed,
                            muon_leaves(params))

    return optax.chain(
        add_decoupled_weight_decay(muon_decay, lambda p: both(p, True)),
        add_decoupled_weight_decay(adam_decay, lambda p: both(p, False)))


def _is_route(x):
    return (x is None or isinstance(x, (bool, np.bool_, MuonDimensionNumbers, optax.MaskedNode))
            or (isinstance(x, (jax.Array, np.ndarray)) and x.ndim == 0 and x.dtype == bool))


class _Routing:
    """A muon_mask resolved per leaf: `MuonDimensionNumbers` (Muon) or None (AdamW).

    Works on the full params and on the masked trees `optax.partition` hands to its inner
    transforms (whose other leaves are `optax.MaskedNode`s).
    """

    def __init__(self, muon_mask):
        self.muon_mask = muon_mask

    def resolve(self, params):
        spec = self.muon_mask(params) if callable(self.muon_mask) else self.muon_mask

        def per_leaf(route, subtree):
            if isinstance(route, optax.MaskedNode):
                return route
            if isinstance(route, MuonDimensionNumbers) or route is None:
                return jax.tree.map(lambda _: route, subtree)
            # True: a 2-D (fan_in, fan_out) leaf; False: AdamW. `True` on other shapes is
            # caught by `checked`, so the layout here only has to be a valid placeholder.
            return jax.tree.map(lambda _: FLAX_LAYOUT if bool(route) else None, subtree)

        return jax.tree.map(per_leaf, spec, params, is_leaf=_is_route)

    def labels(self, params):
        return jax.tree.map(lambda dims: "adam" if dims is None else "muon",
                            self.resolve(params), is_leaf=_is_route)

    def dimension_numbers(self, params):
        return self.resolve(params)

    def checked(self, init):
        """`init` that first rejects `True` on a leaf that is not 2-D."""
        def init_fn(params):
            spec = self.muon_mask(params) if callable(self.muon_mask) else self.muon_mask

            def check(path, route, subtree):
                if isinstance(route, MuonDimensionNumbers) or route is None or not bool(route):
                    return
                for subpath, leaf in jax.tree.leaves_with_path(subtree):
                    if jnp.ndim(leaf) != 2:
                        raise ValueError(
                            f"muon_mask=True needs a 2-D leaf, got shape {jnp.shape(leaf)} at "
                            f"{jax.tree_util.keystr(path + subpath)}: give it "
                            f"MuonDimensionNumbers or route it to AdamW")

            jax.tree.map_with_path(check, spec, params, is_leaf=_is_route)
            return init(params)

        return init_fn
