"""optim._blocks: the products Shampoo and SOAP share, against numpy."""
import jax
import numpy as np
import pytest

from ravine.optim import _blocks


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


def spd_with_spectrum(key, eigenvalues):
    """Q diag(eigenvalues) Q^T with a random orthogonal Q, in float64."""
    n = len(eigenvalues)
    q, _ = np.linalg.qr(np.asarray(jax.random.normal(key, (n, n)), np.float64))
    return (q * np.asarray(eigenvalues)) @ q.T


def numpy_inverse_root(matrices, p, eps):
    """(A + eps * lambda_max I)^(-1/p) in float64, per matrix."""
    out = []
    for a in np.asarray(matrices, np.float64):
        w, v = np.linalg.eigh(a)
        w = np.maximum(w, 0) + eps * w[-1]
        out.append((v * w ** (-1.0 / p)) @ v.T)
    return np.array(out)


def relative_errors(got, want):
    got = np.asarray(got, np.float64)
    return np.linalg.norm(got - want, axis=(-2, -1)) / np.linalg.norm(want, axis=(-2, -1))


@pytest.mark.parametrize("p", [2, 4])
@pytest.mark.parametrize("scale", [1e-20, 1.0, 1e20])
def test_newton_root_is_right_at_any_scale_of_the_statistics(p, scale):
    # Eigenvalues spread over 4 decades; statistics of 1e20 or 1e-20 (float32 squares of
    # entries that size overflow / underflow) must give the same root, rescaled.
    spectrum = np.logspace(0, -4, 48)
    a = np.stack([spd_with_spectrum(jax.random.key(i), spectrum) for i in range(2)]) * scale
    a = a.astype(np.float32)
    want = numpy_inverse_root(a, p, 1e-6)
    newton = _blocks.inverse_root_newton(jax.numpy.asarray(a), p, 1e-6, True)
    eigh = _blocks.inverse_root_eigh(jax.numpy.asarray(a), p, 1e-6, True)
    assert np.max(relative_errors(eigh, want)) < 1e-3
    assert np.max(relative_errors(newton, want)) < 1e-3


@pytest.mark.parametrize("p", [2, 4])
def test_scaled_newton_takes_fewer_steps_than_plain_newton_can(p):
    # Eigenvalues of M_0 reach down to z * d (d = 1e-6 lambda_max, z = (1+p) / (2 |A|_F)). A
    # plain coupled Newton step multiplies a small eigenvalue by at most ((p+1)/p)^p, so it
    # needs at least log(1/2 / smallest) / log(((p+1)/p)^p) steps to bring it to 1/2; the
    # scaled iteration converges (to max|M - I| <= 1e-6) in fewer steps than that.
    spectrum = np.concatenate([np.logspace(0, -3, 40), np.zeros(24)])
    a = spd_with_spectrum(jax.random.key(3), spectrum).astype(np.float32)[None]
    damping = 1e-6 * spectrum[0]
    frobenius = np.sqrt(np.sum((spectrum + damping) ** 2))
    smallest = (1 + p) / (2 * frobenius) * damping
    plain_needs = np.log(0.5 / smallest) / np.log(((p + 1) / p) ** p)
    root, steps = jax.jit(_blocks.coupled_newton, static_argnums=(1, 2, 3))(
        jax.numpy.asarray(a), p, 1e-6, True)
    assert int(steps) < plain_needs, (int(steps), plain_needs)
    assert np.max(relative_errors(root, numpy_inverse_root(a, p, 1e-6))) < 1e-2


def test_bfloat16_6x_products_are_as_accurate_as_float32():
    a = jax.random.normal(jax.random.key(0), (3, 40, 50)) * jax.numpy.logspace(-3, 3, 50)
    b = jax.random.normal(jax.random.key(1), (3, 50, 30))
    want = np.asarray(a, np.float64) @ np.asarray(b, np.float64)

    def error(got):
        return np.max(np.abs(np.asarray(got, np.float64) - want)) / np.max(np.abs(want))

    one_pass = jax.numpy.matmul(a.astype(jax.numpy.bfloat16), b.astype(jax.numpy.bfloat16),
                                preferred_element_type=jax.numpy.float32)
    assert error(one_pass) > 1e-3  # what the sum of six improves on
    assert error(jax.jit(_blocks.matmul, static_argnums=2)(a, b, "bfloat16_6x")) < 1e-6
    assert error(_blocks.matmul(a, b, "float32")) < 1e-6


@pytest.mark.parametrize("p", [2, 4])
def test_newton_roots_from_bfloat16_products_are_as_accurate_as_float32(p):
    # Damped statistics with a null space: the hard case for float32 roots.
    spectrum = np.concatenate([np.logspace(0, -4, 48), np.zeros(16)])
    a = np.stack([spd_with_spectrum(jax.random.key(i), spectrum) for i in range(2)])
    a = a.astype(np.float32)
    want = numpy_inverse_root(a, p, 1e-6)
    newton = jax.jit(_blocks.coupled_newton, static_argnums=(1, 2, 3, 4, 5, 6))
    float32, steps32 = newton(jax.numpy.asarray(a), p, 1e-6, True, 100, 1e-6, "float32")
    bfloat16, steps16 = newton(jax.numpy.asarray(a), p, 1e-6, True, 100, 1e-6, "bfloat16_6x")
    assert abs(int(steps16) - int(steps32)) <= 1
    assert np.max(relative_errors(bfloat16, want)) < 1.2 * np.max(relative_errors(float32, want))


@pytest.mark.parametrize("vmapped", [False, True])
def test_per_matrix_is_one_lapack_call_per_matrix_on_cpu_even_under_vmap(vmapped):
    """jaxlib 0.10's batched CPU eigh can deadlock XLA's thread pool (`per_matrix`); a vmap
    over the runs of a sweep must not batch it either. The numbers: numpy's, per matrix."""
    import jax.numpy as jnp  # noqa: PLC0415
    x = jax.random.normal(jax.random.key(0), (2, 3, 8, 8))
    matrices = x @ jnp.swapaxes(x, -1, -2)
    fn = lambda m: _blocks.per_matrix(jnp.linalg.eigh, m)  # noqa: E731
    fn = jax.jit(jax.vmap(fn) if vmapped else fn)
    values, vectors = fn(matrices)
    expected_values, expected_vectors = np.linalg.eigh(np.asarray(matrices, np.float64))
    np.testing.assert_allclose(values, expected_values, rtol=1e-4, atol=1e-4)
    # eigenvectors up to sign: compare the projections V V^T column by column
    np.testing.assert_allclose(np.abs(np.einsum("...ij,...ij->...j", vectors,
                                                expected_vectors)), 1.0, atol=1e-3)
    if jax.default_backend() == "cpu":
        hlo = fn.lower(matrices).compile().as_text()
        calls = [line for line in hlo.splitlines() if "syevd" in line and "custom-call(" in line]
        assert len(calls) == 6, calls
        for call in calls:  # each returns one 8x8 matrix: no batch dims
            assert call.split("=", 1)[1].lstrip().startswith("(f32[8,8]"), call
