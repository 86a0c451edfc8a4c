"""Stochastic rounding: updating low-precision (bf16 / fp16) params without master weights.

Params stored in bfloat16 and updated with round-to-nearest lose every update smaller than
half the spacing of bfloat16 numbers around the weight: `w + u == w` once |w| / |u| >= 256
for a weight that is a power of two, and for every weight once |w| / |u| >= 512 (bfloat16
keeps 8 significant bits; float16 keeps 11, so 2048 and 4096). Mixed-precision training
avoids this with float32 master weights (Micikevicius et al. 2018). Stochastic rounding
avoids it without them: `w + u` is rounded up with probability equal to its distance from
the number below, in units of the spacing, so the stored weight is an unbiased estimate of
the exact sum (`E[round(w + u)] = w + u`) and many small updates add up in expectation
(Gupta et al. 2015; Zamirai et al. 2020 recover float32 accuracy training in pure bfloat16
this way).

Two pieces, pure functions (the PRNG key is an argument, so a step stays reproducible):

  stochastic_round(x, dtype, key)               x rounded to dtype stochastically
  apply_updates_stochastic(params, updates, key)  `optax.apply_updates`, with the sum
                                                  `p + u` formed in float32 and rounded
                                                  stochastically to each param's dtype

References:
  Gupta et al. 2015, "Deep Learning with Limited Numerical Precision",
    https://arxiv.org/abs/1502.02551
  Micikevicius et al. 2018, "Mixed Precision Training", https://arxiv.org/abs/1710.03740
  Zamirai et al. 2020, "Revisiting BFloat16 Training", https://arxiv.org/abs/2010.06192
"""
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _is_float(dtype) -> bool:
    return jnp.issubdtype(dtype, jnp.floating)


def _round_float32_to_bfloat16(x: jax.Array, key: jax.Array) -> jax.Array:
    """bfloat16 is the top 16 bits of float32. Adding 16 uniform random bits to the low half
    and dropping it carries into the kept half with probability (low half) / 2^16, which is
    exactly the distance to the number below in units of the spacing: unbiased, and one
    integer add per element. The bits are sign-magnitude, so this rounds |x| and negative
    numbers are handled alike; carries that run into the exponent move to the next binade,
    as they should."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    noise = jax.random.bits(key, x.shape, jnp.uint16).astype(jnp.uint32)
    rounded = jax.lax.bitcast_convert_type((bits + noise) & jnp.uint32(0xFFFF0000), jnp.float32)
    # inf stays inf by itself (its low half is 0); a NaN with a payload only in the low half
    # would turn into inf, so non-finite values take the ordinary conversion.
    return jnp.where(jnp.isfinite(x), rounded.astype(jnp.bfloat16), x.astype(jnp.bfloat16))


def _round_generic(x: jax.Array, dtype, key: jax.Array) -> jax.Array:
    """Any narrowing float conversion: pick the two `dtype` neighbours lo <= x <= hi and take
    hi with probability (x - lo) / (hi - lo). Differences of neighbours are exact in x's
    dtype, so the probability is exact up to the 23 random bits of `uniform`."""
    nearest = x.astype(dtype)
    back = nearest.astype(x.dtype)
    above = back > x
    other = jnp.nextafter(nearest, jnp.where(above, -jnp.inf, jnp.inf).astype(dtype))
    lo = jnp.where(above, other, nearest)
    hi = jnp.where(above, nearest, other)
    lo_wide, hi_wide = lo.astype(x.dtype), hi.astype(x.dtype)
    # x == lo (exact, inf) gives p_up = 0 (or NaN, which compares False): keep `nearest`.
    p_up = (x - lo_wide) / (hi_wide - lo_wide)
    u = jax.random.uniform(key, x.shape, jnp.float32).astype(x.dtype)
    return jnp.where(u < p_up, hi, lo)


def stochastic_round(x: jax.Array, dtype: Any, key: jax.Array) -> jax.Array:
    """Rounds `x` to the float `dtype` up or down at random, unbiased: E[result] = x.

    Of the two `dtype` numbers lo <= x <= hi around x, returns hi with probability
    (x - lo) / (hi - lo) and lo otherwise; values `dtype` holds exactly are returned
    unchanged. A conversion that does not narrow (e.g. bfloat16 -> float32) is the ordinary
    exact cast. float32 -> bfloat16 uses the integer trick (add 16 random bits below
    bfloat16's last bit, drop them); other pairs the two neighbours from `jnp.nextafter`.

    Args:
      x: a floating array.
      dtype: the floating dtype to round to (bfloat16, float16, ...).
      key: a PRNG key; each element draws independently.

    Returns:
      An array of `dtype` with x's shape.

    References:
      Gupta et al. 2015, https://arxiv.org/abs/1502.02551 (Sec. 3, stochastic rounding).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from ravine import optim
      >>> x = jnp.full((100_000,), 1.0 + 2.0**-10)  # 1/8 of the way from 1 to 1 + 2^-7
      >>> x.astype(jnp.bfloat16)[0]  # round to nearest: always 1
      Array(1, dtype=bfloat16)
      >>> y = optim.stochastic_round(x, jnp.bfloat16, jax.random.key(0))
      >>> sorted(set(y.astype(float).tolist()))  # the two neighbours
      [1.0, 1.0078125]
      >>> abs(float(y.astype(jnp.float32).mean()) - (1 + 2**-10)) < 3e-5  # unbiased
      True
    """
    x = jnp.asarray(x)
    dtype = np.dtype(dtype)
    if not _is_float(x.dtype) or not _is_float(dtype):
        raise ValueError(f"stochastic_round needs floating dtypes, got {x.dtype} -> {dtype}")
    if jnp.finfo(dtype).bits >= jnp.finfo(x.dtype).bits:
        return x.astype(dtype)  # widening (or same width): exact, nothing to round
    if x.dtype == jnp.float32 and dtype == jnp.bfloat16:
        return _round_float32_to_bfloat16(x, key)
    return _round_generic(x, dtype, key)


def apply_updates_stochastic(params: Any, updates: Any, key: jax.Array) -> Any:
    """`optax.apply_updates` for low-precision params: `p + u` rounded stochastically.

    Each sum is formed in float32 (or wider, if p or u is wider) and rounded to the param's
    dtype with `stochastic_round`, so an update far below the param's spacing still moves
    it in expectation, where round-to-nearest (`optax.apply_updates`) would drop it. Params
    at least as wide as the sum (float32 params, float32 updates) get the ordinary exact
    `p + u`, so the function is a drop-in for any mixture of dtypes. Leaves draw from
    independent keys (`key` split per leaf); `None` leaves stay None, as in optax.

    Args:
      params: a pytree of params (any floating dtypes).
      updates: a pytree of updates with params' structure (e.g. from `tx.update`).
      key: a PRNG key for this step (e.g. `jax.random.fold_in(key, step)`).

    Returns:
      The new params, each leaf in its old dtype.

    References:
      Zamirai et al. 2020, "Revisiting BFloat16 Training", https://arxiv.org/abs/2010.06192.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from ravine import optim
      >>> w = {"w": jnp.ones(4096, jnp.bfloat16)}
      >>> u = {"w": jnp.full(4096, 1e-3, jnp.float32)}  # |w| / |u| = 1000 > 256: vanishes
      >>> float(optax.apply_updates(w, u)["w"].astype(jnp.float32).mean())
      1.0
      >>> new = optim.apply_updates_stochastic(w, u, jax.random.key(0))
      >>> new["w"].dtype, abs(float(new["w"].astype(jnp.float32).mean()) - 1.001) < 2e-4
      (dtype(bfloat16), True)
    """
    leaves, treedef = jax.tree.flatten(params, is_leaf=lambda x: x is None)
    update_leaves = treedef.flatten_up_to(updates)
    keys = jax.random.split(key, max(len(leaves), 1))

    def apply(p, u, k):
        if p is None:
            return None
        p, u = jnp.asarray(p), jnp.asarray(u)
        wide = jnp.promote_types(jnp.promote_types(p.dtype, u.dtype), jnp.float32)
        total = p.astype(wide) + u.astype(wide)
        if not _is_float(p.dtype) or np.dtype(wide) == np.dtype(p.dtype):
            return total.astype(p.dtype)
        return stochastic_round(total, p.dtype, k)

    return treedef.unflatten([apply(p, u, k) for p, u, k in zip(leaves, update_leaves, keys)])
