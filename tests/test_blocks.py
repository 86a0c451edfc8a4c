"""optim._blocks: the products Shampoo and SOAP share, against numpy."""
import jax
import numpy as np
import pytest

from optim import _blocks


def numpy_multiply_dims(x, matrices, batch_ndim, transpose):
    """Dim j of every batch item times M_j (contracting M_j's first index; last with
    `transpose`), one dim at a time in float64."""
    out = np.array(x, np.float64)
    for j, m in enumerate(matrices):
        if m is None:
            continue
        m = np.asarray(m, np.float64)
        m = np.swapaxes(m, -1, -2) if transpose else m
        axis = batch_ndim + j
        # out[..., i'_j, ...] = sum_i out[..., i_j, ...] m[..., i_j, i'_j], per batch item.
        moved = np.moveaxis(out, axis, -1)  # (*batch, ..., i_j)
        expand = (slice(None),) * batch_ndim + (None,) * (moved.ndim - batch_ndim - 1)
        product = np.einsum("...i,...ik->...k", moved, m[expand + (Ellipsis,)])
        out = np.moveaxis(product, -1, axis)
    return out


@pytest.mark.parametrize("transpose", [False, True])
@pytest.mark.parametrize("shape, sizes, batch_ndim", [
    ((2, 3, 5, 4), (5, 4), 2),      # matrix blocks on a 2x3 grid: the two-matmul path
    ((5, 4), (5, 4), 0),            # one matrix, no batch
    ((2, 5, 4, 3), (5, 4, 3), 1),   # order-3 blocks: the general path
    ((5, 4), (5, None), 0),         # one dim left alone
])
def test_multiply_dims_matches_numpy(shape, sizes, batch_ndim, transpose):
    keys = jax.random.split(jax.random.key(0), len(sizes) + 1)
    batch = shape[:batch_ndim]
    x = jax.random.normal(keys[0], shape)
    matrices = [None if n is None else jax.random.normal(k, batch + (n, n))
                for k, n in zip(keys[1:], sizes)]
    got = _blocks.multiply_dims(x, matrices, batch_ndim, transpose=transpose)
    want = numpy_multiply_dims(x, matrices, batch_ndim, transpose)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("axis", [0, 1])
def test_gram_matches_numpy(axis):
    x = jax.random.normal(jax.random.key(1), (3, 5, 4))
    want = np.array([m @ m.T if axis == 0 else m.T @ m for m in np.asarray(x, np.float64)])
    np.testing.assert_allclose(_blocks.gram(x, axis, 1), want, rtol=1e-5, atol=1e-5)
