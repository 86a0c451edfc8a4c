"""Block layout and batched matrix functions shared by Shampoo and SOAP (and the argument
and dtype checks the matrix optimizers share with Muon, and the handling of Flax's param
wrappers that every optimizer with per-leaf state structures shares).

Blocking. A leaf of shape `(d_0, ..., d_{k-1})` is cut into blocks of at most `block_size`
entries per dim: dim j holds `g_j = ceil(d_j / b_j)` blocks of `b_j = min(d_j, block_size)`
entries, the last one zero-padded. The blocked layout of the leaf is
`(g_0, ..., g_{k-1}, b_0, ..., b_{k-1})`: the block grid leads, so every per-block quantity
(statistics and roots `(*grid, b_j, b_j)`) also has the grid as its leading dims.

Sharding. Keeping the grid as separate leading dims (rather than flattening all blocks of
all leaves into one stack) is what lets the state follow the params: grid dim j can carry
the mesh axes of param dim j, so when a dim is split at block boundaries over devices, each
device holds the statistics and roots of the blocks of its own shard and the statistics
update needs no communication. Under jit, GSPMD propagates exactly this layout from the
gradients' shardings (grid dim j gets the axes of param dim j). A per-leaf state node whose
arrays all start with the grid says so with the class attribute `FOLLOWS_PARAM_GRID = True`,
for sharding rules that lay out optimizer state ahead of time. Same-shape stacks of
different leaves are stacked along a new leading axis only inside the root computation
(`map_stacked`), which keeps the grid dims and their shardings intact.

Flax's param wrappers. Params may come wrapped one leaf at a time: `nnx.Optimizer` passes
`init` the `nnx.Param` variables of an NNX model, and linen's `model.init` boxes the leaves
of a model built with `nn.with_logical_partitioning` in `nn.Partitioned`. Each wrapper is a
pytree node holding one array and metadata about that array's dims (logical axis names,
sharding), so `jax.tree.map(f, params)` puts whatever `f` returns inside a copy of the
param's wrapper. That is right for an array shaped like the param (optax's moments), and
wrong for a per-leaf structure such as `ShampooBlocks` or a `QuantizedArray`: nnx keeps a
wrapper's contents as one value and turns a structure there into an `nnx.State` at the first
write-back, and the param's axis names do not describe a statistic's `(*grid, b, b)` dims.
So the optimizers with such structures build them with `wrapped_leaves` and `wrap_like`:
the structure sits where the param's wrapper was, and a copy of the wrapper goes only around
the arrays laid out like the param (8-bit codes), or none (statistics, roots, scales).
"""
import collections
import math
import sys
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

HIGHEST = lax.Precision.HIGHEST


class Blocking(NamedTuple):
    """How a leaf is cut into blocks (static: built from its shape)."""
    shape: tuple  # the leaf's shape
    block: tuple  # entries per block along each dim
    grid: tuple   # blocks along each dim

    @property
    def padded(self):
        return any(g * b != d for d, b, g in zip(self.shape, self.block, self.grid))


def make_blocking(shape, block_size):
    """Blocks of at most `block_size` per dim (the last one padded where it does not divide)."""
    block = tuple(min(d, block_size) for d in shape)
    grid = tuple(math.ceil(d / b) if b else 1 for d, b in zip(shape, block))
    return Blocking(tuple(shape), block, grid)


def to_blocks(x, blocking):
    """`x` in the blocked layout `(*grid, *block)`, zero-padded."""
    grid, block = blocking.grid, blocking.block
    if blocking.padded:
        x = jnp.pad(x, [(0, g * b - d) for d, b, g in zip(x.shape, block, grid)])
    k = len(grid)
    x = x.reshape([n for pair in zip(grid, block) for n in pair])
    return x.transpose(tuple(range(0, 2 * k, 2)) + tuple(range(1, 2 * k, 2)))


def from_blocks(x, blocking):
    """Inverse of `to_blocks`: the leaf's shape, padding cropped."""
    grid, block, k = blocking.grid, blocking.block, len(blocking.grid)
    x = x.transpose([i for j in range(k) for i in (j, k + j)])
    x = x.reshape([g * b for g, b in zip(grid, block)])
    if blocking.padded:
        x = x[tuple(slice(0, d) for d in blocking.shape)]
    return x


def block_norms(x, batch_ndim):
    """Frobenius norm of each block of `x` (all dims after the first `batch_ndim`), kept dims."""
    axes = tuple(range(batch_ndim, x.ndim))
    return jnp.sqrt(jnp.sum(jnp.square(x), axis=axes, keepdims=True))


def gram(x, axis, batch_ndim, dtype=jnp.float32):
    """Per block, `X_(axis) X_(axis)^T`: `x` contracted with itself over every non-batch dim
    except `batch_ndim + axis` (the mode-`axis` unfolding times its transpose).

    For a matrix block G this is `G G^T` (axis 0) or `G^T G` (axis 1). Returns
    `(*batch, n, n)` with `n = x.shape[batch_ndim + axis]`, accumulated in `dtype`.
    """
    batch = tuple(range(batch_ndim))
    contract = tuple(d for d in range(batch_ndim, x.ndim) if d != batch_ndim + axis)
    return lax.dot_general(x, x, ((contract, contract), (batch, batch)),
                           preferred_element_type=dtype)


def multiply_dims(x, matrices, batch_ndim, transpose=False):
    """Multiplies every non-batch dim j of `x` by `matrices[j]` (None: identity).

    `out[..., i'_j, ...] = sum_{i_j} x[..., i_j, ...] M_j[..., i_j, i'_j]` (with `transpose`,
    `M_j[..., i'_j, i_j]`): for a matrix block G and symmetric P_0, P_1 this is `P_0 G P_1`;
    with eigenbases Q_j it is `Q_0^T G Q_1` (and `Q_0 G Q_1^T` with `transpose`). Each
    product contracts the first non-batch dim and appends the result last, so after all
    dims the order is restored without transposes of our own. Matrices (two dims, both
    multiplied) take two plain matmuls instead: `M_0^T (X M_1)`, or `M_0 (X M_1^T)` with
    `transpose`, whose left operands are never transposed; XLA:CPU runs those 1.3x faster
    than the contractions over the first dim above.
    """
    if len(matrices) == 2 and None not in matrices and x.ndim == batch_ndim + 2:
        m0, m1 = (m.astype(x.dtype) for m in matrices)
        if transpose:
            return jnp.matmul(m0, jnp.matmul(x, jnp.swapaxes(m1, -1, -2)))
        return jnp.matmul(jnp.swapaxes(m0, -1, -2), jnp.matmul(x, m1))
    batch = tuple(range(batch_ndim))
    for matrix in matrices:
        if matrix is None:
            x = jnp.moveaxis(x, batch_ndim, -1)
        else:
            contract = batch_ndim + (1 if transpose else 0)
            x = lax.dot_general(x, matrix.astype(x.dtype),
                                (((batch_ndim,), (contract,)), (batch, batch)))
    return x


def map_stacked(fn, args, keys):
    """`[fn(key, *a) for a, key in zip(args, keys)]` with one call of `fn` per distinct key.

    Items with equal keys (which must have equal shapes) are stacked along a new leading axis
    and `fn` gets the stacks; it returns a pytree of stacked results, split back per item.
    Batching same-shape matrices makes one eigh / matmul call of a large batch instead of
    many small ones; stacking on a new axis leaves the items' own (sharded) dims alone.
    """
    groups = collections.defaultdict(list)
    for index, key in enumerate(keys):
        groups[key].append(index)
    results = [None] * len(args)
    for key, indices in groups.items():
        stacked = [jnp.stack(parts) for parts in zip(*(args[i] for i in indices))]
        out = fn(key, *stacked)
        for position, index in enumerate(indices):
            results[index] = jax.tree.map(lambda r, p=position: r[p], out)
    return results


def per_matrix(fn, matrices):
    """`fn` (a LAPACK-backed decomposition such as `jnp.linalg.eigh`) of `matrices[..., n, n]`.

    On CPU it is called once per matrix, under `jax.vmap` too: jaxlib 0.10's batched CPU
    LAPACK kernels occupy a thread of XLA's intra-op pool while they wait for their batch to
    run on that same pool, so as soon as every thread of the pool holds one batched call
    (two on a 2-core machine) they deadlock: the program waits forever with every thread
    idle (seen with a 1-device mesh, with 8 emulated devices, and in a vmapped sweep of
    Shampoo runs; fixed in jaxlib 0.11.1). Separate one-matrix calls run side by side on
    every core. On CPU a sharded batch dim is gathered for this, which costs only host
    copies. Elsewhere one batched call keeps the batch dims' shardings.
    """
    if jax.default_backend() != "cpu":
        return fn(matrices)
    batch = matrices.shape[:-2]
    flat = matrices.reshape((-1,) + matrices.shape[-2:])
    outs = jax.vmap(_one_matrix_per_call(fn))(flat)  # unrolled by its vmap rule
    return jax.tree.map(lambda out: out.reshape(batch + out.shape[1:]), outs)


def _one_matrix_per_call(fn):
    """`fn` of one matrix that stays one call per matrix under `jax.vmap`: the vmap rule
    calls it on each slice of the mapped axis (unrolled, so the calls can run side by side)
    instead of letting `fn` batch."""
    @jax.custom_batching.custom_vmap
    def call(matrix):
        return fn(matrix)

    @call.def_vmap
    def vmap_rule(axis_size, in_batched, matrix):
        del in_batched  # the only argument, so it is the batched one; its axis is 0
        outs = [call(matrix[i]) for i in range(axis_size)]
        stacked = jax.tree.map(lambda *parts: jnp.stack(parts), *outs)
        return stacked, jax.tree.map(lambda _: True, stacked)

    return call


def static_value(name, value):
    """A hyperparameter that decides the state's structure, as a Python value.

    `optax.inject_hyperparams` passes numeric hyperparameters as arrays, traced under jit;
    a concrete 0-d array is read back as the number it holds, a traced one is a ValueError
    saying how to keep the argument static.
    """
    if isinstance(value, jax.core.Tracer):
        raise ValueError(f"{name} decides the optimizer state's structure, so it must be a "
                         f"static Python value, got a traced array; with "
                         f"optax.inject_hyperparams pass static_args=({name!r},)")
    if isinstance(value, (jax.Array, np.ndarray, np.generic)) and np.ndim(value) == 0:
        return np.asarray(value).item()
    return value


def static_values(**values):
    """`static_value` of several arguments, with one error naming every traced one.

    An argument whose name ends in "dtype" is named too when it is an array: that is what
    `optax.inject_hyperparams` makes of a dtype (it takes the class for a schedule); alone,
    it is left to `_validate.floating_dtype`'s own message.
    """
    flagged = [name for name, value in values.items() if isinstance(value, jax.core.Tracer)]
    if flagged:
        flagged += [name for name, value in values.items() if name.endswith("dtype")
                    and isinstance(value, (jax.Array, np.ndarray)) and name not in flagged]
        raise ValueError(f"{', '.join(flagged)} decide the optimizer state's structure, so they "
                         f"must be static Python values, got arrays; with "
                         f"optax.inject_hyperparams pass static_args={tuple(flagged)!r}")
    return tuple(static_value(name, value) for name, value in values.items()
                 if not name.endswith("dtype"))


def _wrapper_types():
    """The classes Flax wraps params in: nnx variables and linen's boxes (`nn.Partitioned`
    and every other `AxisMetadata`). Looked up among the imported modules: a tree can only hold
    one once Flax is imported, and optim imports no framework of its own."""
    types = []
    nnx = sys.modules.get("flax.nnx")
    if nnx is not None and isinstance(getattr(nnx, "Variable", None), type):
        types.append(nnx.Variable)
    meta = sys.modules.get("flax.core.meta")
    if meta is not None and isinstance(getattr(meta, "AxisMetadata", None), type):
        types.append(meta.AxisMetadata)
    return tuple(types)


def is_wrapped(x):
    """Whether `x` is a Flax param wrapper (an nnx variable or a linen box)."""
    types = _wrapper_types()
    return bool(types) and isinstance(x, types)


def _open(wrapper):
    """The one value a wrapper holds and the treedef that wraps another value the same way."""
    children, treedef = jax.tree.flatten(wrapper, is_leaf=lambda x: x is not wrapper)
    if len(children) != 1:
        raise ValueError(f"expected a param wrapper holding one value, got {type(wrapper)} "
                         f"holding {len(children)}")
    return children[0], treedef


def unwrap(x):
    """The array inside a (possibly nested) Flax param wrapper; anything else as it is."""
    while is_wrapped(x):
        x = _open(x)[0]
    return x


def wrap_like(wrapped, value):
    """`value` in a copy of `wrapped`'s wrappers (same type and metadata); `value` itself when
    `wrapped` is not wrapped. Only for arrays laid out like the wrapped param."""
    if not is_wrapped(wrapped):
        return value
    inner, treedef = _open(wrapped)
    return treedef.unflatten([wrap_like(inner, value)])


def wrapped_leaves(tree):
    """The leaves of `tree`, each with its Flax wrapper if it has one, and the treedef with
    those wrapped leaves as its leaves: `treedef.unflatten(per_leaf)` puts one per-leaf value
    (a structure, an array or None) where each param is, without the param's wrapper around
    it; `treedef.flatten_up_to(state_field)` gets them back, from the wrapped params that
    `init` saw and from the plain (or differently wrapped) gradients `update` sees alike."""
    return jax.tree.flatten(tree, is_leaf=is_wrapped)


def reject_complex(params, name):
    """ValueError naming the first complex leaf of `params` (the matrix optimizers' products
    G G^T and roots are written for real G; optax's conjugating forms are not used here)."""
    for path, leaf in jax.tree.leaves_with_path(params):
        if jnp.iscomplexobj(leaf):
            raise ValueError(f"{name} does not support complex params, got dtype "
                             f"{jnp.result_type(leaf)} at {jax.tree_util.keystr(path)}")


def keep_finite(new, old):
    """`new` where a whole matrix (last two dims) is finite, else `old`."""
    ok = jnp.all(jnp.isfinite(new), axis=(-2, -1), keepdims=True)
    return jnp.where(ok, new, old)


def eye_like(shape, dtype=jnp.float32):
    """Identity matrices of shape `(..., n, n)`."""
    return jnp.broadcast_to(jnp.eye(shape[-1], dtype=dtype), shape)


def _damping(max_eigenvalue, eps, relative_eps):
    return eps * max_eigenvalue if relative_eps else jnp.asarray(eps, jnp.float32)


def inverse_root_eigh(matrices, p, eps, relative_eps):
    """`(A + d I)^(-1/p)` of symmetric PSD matrices `(..., n, n)` by eigendecomposition.

    Eigenvalues below 0 (rounding) are clipped to 0; `d = eps * lambda_max(A)` when
    `relative_eps`, else `eps`. Computed in float32.
    """
    eigenvalues, vectors = per_matrix(jnp.linalg.eigh, matrices.astype(jnp.float32))
    eigenvalues = jnp.maximum(eigenvalues, 0.0)
    damping = _damping(eigenvalues[..., -1:], eps, relative_eps)
    scale = (eigenvalues + damping) ** (-1.0 / p)
    return jnp.matmul(vectors * scale[..., None, :], jnp.swapaxes(vectors, -1, -2),
                      precision=HIGHEST)


def max_eigenvalue(matrices, iterations=20):
    """Power-iteration estimate of the largest eigenvalue of PSD matrices `(..., n, n)`."""
    n = matrices.shape[-1]
    start = jax.random.normal(jax.random.key(0), (n, 1), jnp.float32)
    vector = jnp.broadcast_to(start, matrices.shape[:-1] + (1,))

    def step(_, v):
        v = jnp.matmul(matrices, v, precision=HIGHEST)
        return v * lax.rsqrt(jnp.maximum(jnp.sum(v * v, axis=-2, keepdims=True), 1e-30))

    vector = lax.fori_loop(0, iterations, step, vector)
    return jnp.sum(vector * jnp.matmul(matrices, vector, precision=HIGHEST), axis=(-2, -1))


# How the coupled Newton iteration multiplies: float32 at full precision, or as a sum of six
# bfloat16 products, which GPU/TPU matrix units run several times faster.
PRODUCT_PRECISIONS = ("float32", "bfloat16_6x")


def _bfloat16_parts(x):
    """float32 `x` as three bfloat16 arrays summing to it (to float32's precision), largest
    first: each one the rounding of what the previous ones leave.

    The rounding is `reduce_precision`, not a cast there and back: XLA:GPU (and XLA:CPU
    where it simplifies float conversions) may drop `convert(convert(x, bf16), f32)` as
    "excess precision", which would make every part after the first zero.
    """
    parts = []
    for i in range(3):
        rounded = lax.reduce_precision(x, exponent_bits=8, mantissa_bits=7)
        parts.append(rounded.astype(jnp.bfloat16))  # exact: `rounded` is a bfloat16 value
        if i < 2:
            x = x - rounded
    return parts


def matmul(a, b, precision="float32"):
    """`a @ b` of float32 arrays, batched, at one of `PRODUCT_PRECISIONS`.

    "float32" is one product at `Precision.HIGHEST`. "bfloat16_6x" splits
    `a = a_0 + a_1 + a_2` and `b` alike into bfloat16 parts and adds the six products
    `a_i b_j` with `i + j < 3`, accumulated in float32, smallest first: about float32's
    relative error (2^-24 per part left out) from bfloat16 products (Henry, Tang & Heinecke
    2019, "Leveraging the bfloat16 Artificial Intelligence Datatype For Higher-Precision
    Computations"; XLA's BF16_BF16_F32_X6 dot algorithm). Written out here rather than asked
    of XLA so that every backend runs, and the CPU tests check, the same arithmetic. (Three
    products, `i + j < 2`, are 2^-16 accurate per product; in Newton roots of statistics
    with a null space that gave 16% errors where float32 gives 2%, so it is not offered.)
    """
    if precision == "float32":
        return jnp.matmul(a, b, precision=HIGHEST)
    a_parts, b_parts = _bfloat16_parts(a), _bfloat16_parts(b)
    out = None
    for order in (2, 1, 0):
        for i in range(order + 1):
            term = jnp.matmul(a_parts[i], b_parts[order - i],
                              preferred_element_type=jnp.float32)
            out = term if out is None else out + term
    return out


def _matrix_power(x, p, precision="float32"):
    """x^p for a static integer p >= 1, by repeated squaring."""
    result = None
    while p:
        if p & 1:
            result = x if result is None else matmul(result, x, precision)
        p >>= 1
        if p:
            x = matmul(x, x, precision)
    return result


def _newton_map(m, p):
    """What one coupled Newton step does to an eigenvalue m of M: `m ((p+1-m)/p)^p`."""
    return m * ((p + 1.0 - m) / p) ** p


def _balancing_scale(lower, upper, p, bisections=30):
    """The s in `[1/upper, min(1/lower, 0.75 (p+1) / upper)]` with
    `f(s lower) = f(s upper)` (f: `_newton_map`), by bisection.

    f rises on (0, 1] and falls on [1, p+1), so after a step from `s M` every eigenvalue lies
    in `[f(s lower), 1]`: the highest low end one step can reach. The cap keeps `s M`'s
    spectrum well inside (0, p+1), where the iteration converges, whatever rounding does.
    """
    def bisect(_, bracket):
        low, high = bracket
        mid = 0.5 * (low + high)
        rising = _newton_map(mid * lower, p) < _newton_map(mid * upper, p)
        return jnp.where(rising, mid, low), jnp.where(rising, high, mid)

    start = (1.0 / upper, jnp.minimum(1.0 / lower, 0.75 * (p + 1.0) / upper))
    low, high = lax.fori_loop(0, bisections, bisect, start)
    return 0.5 * (low + high)


def coupled_newton(matrices, p, eps, relative_eps, max_iterations=100, tolerance=1e-6,
                   precision="float32"):
    """`(A + d I)^(-1/p)` and the number of steps taken; see `inverse_root_newton`."""
    a = matrices.astype(jnp.float32)
    eye = eye_like(a.shape)
    # Work on A / c, c = max |A_ij|: no float32 product below over- or underflows, whatever
    # the statistics' scale; (A + d I)^(-1/p) = c^(-1/p) (A / c + (d / c) I)^(-1/p).
    c = jnp.max(jnp.abs(a), axis=(-2, -1), keepdims=True)
    c = jnp.where(c > 0, c, 1.0)
    a = a / c
    damping = (eps * max_eigenvalue(a)[..., None, None] if relative_eps
               else jnp.asarray(eps, jnp.float32) / c)
    a = a + damping * eye
    z = (1.0 + p) / (2.0 * jnp.linalg.norm(a, axis=(-2, -1), keepdims=True))
    m, h = z * a, eye * z ** (1.0 / p)
    # A bracket of M's spectrum, tracked through the steps with f. |A|_F >= lambda_max gives
    # the top; the damping or Gershgorin's disks the bottom (floored: eigenvalues under 1e-7
    # are float32 rounding).
    diagonal = jnp.diagonal(a, axis1=-2, axis2=-1)
    off_diagonal = jnp.sum(jnp.abs(a), axis=-1) - jnp.abs(diagonal)
    gershgorin = jnp.min(diagonal - off_diagonal, axis=-1)[..., None, None]
    lower = jnp.maximum(z * jnp.maximum(damping, gershgorin), 1e-7)
    upper = jnp.full_like(lower, (1.0 + p) / 2.0)

    def error(m):
        return jnp.max(jnp.abs(m - eye), axis=(-2, -1), keepdims=True)

    def cond(carry):
        i, _, _, _, _, _, active = carry
        return (i < max_iterations) & jnp.any(active)

    def body(carry):
        i, m, h, err, lower, upper, active = carry
        scaled = active & (lower < 0.5)
        scale = jnp.where(scaled, _balancing_scale(lower, upper, p), 1.0)
        m, h = scale * m, h * scale ** (1.0 / p)  # keeps M = H^p A
        x = ((p + 1.0) * eye - m) / p
        new_m = matmul(_matrix_power(x, p, precision), m, precision)
        new_h = matmul(h, x, precision)
        new_err = error(new_m)
        # A scaled step may raise the error (it lifts the bottom of the spectrum by pushing
        # the top down); an unscaled one that raises it by over 1.2x has hit rounding.
        accept = active & jnp.isfinite(new_err) & ((new_err < 1.2 * err) | scaled)
        low_f, up_f = _newton_map(scale * lower, p), _newton_map(scale * upper, p)
        straddles = (scale * lower <= 1) & (scale * upper >= 1)
        new_lower = jnp.minimum(low_f, up_f)
        new_upper = jnp.where(straddles, 1.0, jnp.maximum(low_f, up_f))
        return (i + 1, jnp.where(accept, new_m, m), jnp.where(accept, new_h, h),
                jnp.where(accept, new_err, err), jnp.where(accept, new_lower, lower),
                jnp.where(accept, new_upper, upper), accept & (new_err > tolerance))

    err = error(m)
    steps, _, h, _, _, _, _ = lax.while_loop(
        cond, body, (0, m, h, err, lower, upper, err > tolerance))
    return h * c ** (-1.0 / p), steps


def inverse_root_newton(matrices, p, eps, relative_eps, max_iterations=100, tolerance=1e-6,
                        precision="float32"):
    """`(A + d I)^(-1/p)` of symmetric PSD matrices `(..., n, n)` by scaled coupled Newton.

    Matmul-only (Guo & Higham 2006; as in Anil et al. 2020). On `A / max|A_ij|` (the root is
    rescaled at the end), with `z = (1+p) / (2 |A + d I|_F)`, `M_0 = z (A + d I)`,
    `H_0 = z^(1/p) I`, each step first scales `M <- s M`, `H <- s^(1/p) H` (which keeps
    `M = H^p (A + d I)`), then `X = ((p+1) I - M) / p`, `M <- X^p M`, `H <- H X`, so that
    `M -> I` and `H -> (A + d I)^(-1/p)`. An eigenvalue m of M moves to
    `f(m) = m ((p+1-m)/p)^p`: unscaled (s = 1), small ones grow only `((p+1)/p)^p` = 2.4x per
    step (p = 4), and damped statistics have eigenvalues down to `d`. M's spectrum is known
    to lie in `[z max(d, g), (1+p)/2]` (g: Gershgorin's lower bound) and is tracked through
    f; while its bottom is under 1/2, s balances f at both ends (`_balancing_scale`), which
    lifts small eigenvalues up to ~7x per step: on statistics damped at 1e-6 of their top
    eigenvalue, 10 steps instead of 18.
    Each matrix stops when `max|M - I| <= tolerance`, or keeps its previous `H` and stops
    when an unscaled step grows that error by more than 1.2x (float32 rounding has taken
    over). `d = eps * lambda_max(A)` (power iteration) when `relative_eps`, else `eps`.
    The step's products are taken at `precision` (see `matmul`); "bfloat16_6x" roots are as
    accurate as "float32" ones.
    """
    return coupled_newton(matrices, p, eps, relative_eps, max_iterations, tolerance,
                          precision)[0]


INVERSE_ROOTS = {"eigh": inverse_root_eigh, "newton": inverse_root_newton}

