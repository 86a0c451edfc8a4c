"""Block-wise dynamic 8-bit quantization (Dettmers et al., 2022), as 8-bit Adam stores moments.

A tensor is cut into blocks of `block_size` consecutive values (row-major, within the
tensor); each block is divided by its absolute maximum and every value is replaced by the
index of the nearest of 256 code values in [-1, 1] (signed) or [0, 1] (unsigned).

The code map is the *dynamic tree* data type of the paper (Dettmers, 2016; section 2.2 of
Dettmers et al., 2022): after the sign bit, a run of e zero bits sets the decimal exponent
10^-e (e = 0..6), a one bit ends the run, and the remaining bits are a linear fraction in
[0.1, 1] (the midpoints of 2^bits equal intervals). Large values get many fraction bits, tiny
ones a large dynamic range: 254 such values, plus 0 and 1. The unsigned map, for Adam's
second moment, uses the sign bit as one more fraction bit.

Encoding is O(1) per value: the top 16 bits of the float32 (sign, exponent, 7 mantissa
bits) index a 65536-entry table holding the number of decision boundaries below that float
interval; no interval holds more than one boundary, so one comparison finishes it. This
gives exactly the nearest code (as `np.searchsorted` on the boundaries would), at the cost
of two small gathers instead of a 256-way or 8-level search per value.

References:
  Dettmers et al., 2022, "8-bit Optimizers via Block-wise Quantization",
  https://arxiv.org/abs/2110.02861; Dettmers, 2016, "8-Bit Approximations for Parallelism
  in Deep Learning", https://arxiv.org/abs/1511.04561
"""
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

EXPONENT_BITS = 7  # exponents 10^0 .. 10^-6
_TINY = np.finfo(np.float32).tiny  # blocks whose absmax is below this are stored as zeros


def dynamic_code_map(signed):
    """The 256 sorted values of the dynamic tree data type, as float32 numpy.

    Args:
      signed: True for [-1, 1] (first moments), False for [0, 1] (second moments).
    """
    values = [0.0, 1.0]
    for e in range(EXPONENT_BITS):
        # Exponent 10^(e - 6) keeps e fraction bits (signed) or e + 1 (the sign bit reused).
        count = 2 ** (e + (0 if signed else 1))
        edges = np.linspace(0.1, 1.0, count + 1)
        fractions = (edges[:-1] + edges[1:]) / 2
        magnitudes = 10.0 ** (e - (EXPONENT_BITS - 1)) * fractions
        values.extend(magnitudes)
        if signed:
            values.extend(-magnitudes)
    values = np.sort(np.asarray(values, np.float32))
    assert values.size == 256, values.size
    return values


@functools.lru_cache(maxsize=2)
def _tables(signed):
    """(code values [256], boundaries [256] with +inf last, 16-bit prefix table [65536] uint8)."""
    codes = dynamic_code_map(signed)
    boundaries = ((codes[:-1].astype(np.float64) + codes[1:]) / 2).astype(np.float32)
    prefixes = np.arange(1 << 16, dtype=np.uint32)
    first = (prefixes << 16).view(np.float32)
    last = ((prefixes << 16) | 0xFFFF).view(np.float32)
    low, high = np.minimum(first, last), np.maximum(first, last)
    finite = np.isfinite(low) & np.isfinite(high)
    low, high = np.where(finite, low, 0), np.where(finite, high, 0)
    below = np.searchsorted(boundaries, low, side="left")  # boundaries < low
    inside = np.searchsorted(boundaries, high, side="right") - below  # in [low, high]
    assert inside.max() <= 1, "a float interval holds two boundaries"
    padded = np.append(boundaries, np.float32(np.inf))
    return codes, padded, below.astype(np.uint8)


def encode(normalized, signed):
    """Index of the nearest code value for each float32 in [-1, 1] (uint8)."""
    _, boundaries, prefix_table = _tables(signed)
    bits = jax.lax.bitcast_convert_type(normalized.astype(jnp.float32), jnp.uint32)
    below = jnp.asarray(prefix_table).at[(bits >> 16).astype(jnp.int32)].get(
        mode="promise_in_bounds").astype(jnp.int32)
    next_boundary = jnp.asarray(boundaries).at[below].get(mode="promise_in_bounds")
    return (below + (normalized >= next_boundary)).astype(jnp.uint8)


def decode(indices, signed):
    """The code values at `indices` (float32)."""
    codes, _, _ = _tables(signed)
    return jnp.asarray(codes).at[indices.astype(jnp.int32)].get(mode="promise_in_bounds")


class QuantizedArray(NamedTuple):
    """An array stored as 8-bit codes with one float32 scale per block.

    `codes` has the array's shape (int8 for signed maps, uint8 for unsigned), so it shards
    like the array; `scales` has one absmax per block of `block_size` consecutive values.
    """
    codes: jax.Array
    scales: jax.Array


def _blocks(x, block_size):
    """`x` flattened, zero-padded and reshaped to `[num_blocks, block_size]`."""
    flat = x.reshape(-1)
    pad = -flat.size % block_size
    if pad:
        flat = jnp.pad(flat, (0, pad))
    return flat.reshape(-1, block_size)


def num_blocks(size, block_size):
    return -(-size // block_size)


def quantize(x, block_size, signed):
    """Block-wise dynamic quantization of `x` (any shape) -> `QuantizedArray`."""
    blocks = _blocks(x.astype(jnp.float32), block_size)
    absmax = jnp.max(jnp.abs(blocks), axis=1)
    usable = absmax >= _TINY
    scales = jnp.where(usable, absmax, 0.0)
    inverse = jnp.where(usable, 1.0 / jnp.where(usable, absmax, 1.0), 0.0)
    indices = encode(blocks * inverse[:, None], signed).reshape(-1)[:x.size].reshape(x.shape)
    if signed:  # int8 codes: index 128 (the smallest positive value) is code 0
        codes = (indices.astype(jnp.int32) - 128).astype(jnp.int8)
    else:
        codes = indices
    return QuantizedArray(codes, scales)


def dequantize(quantized, block_size, signed):
    """The float32 array `quantized` stands for."""
    codes, scales = quantized
    indices = codes.astype(jnp.int32) + 128 if signed else codes
    values = _blocks(decode(indices, signed), block_size) * scales[:, None]
    return values.reshape(-1)[:codes.size].reshape(codes.shape)


def zeros(shape, block_size, signed):
    """The `QuantizedArray` of zeros of `shape` (`quantize(jnp.zeros(shape))`, allocated
    directly)."""
    size = int(np.prod(shape))
    zero_index = int(np.searchsorted(dynamic_code_map(signed), 0.0))
    if signed:
        codes = jnp.full(shape, zero_index - 128, jnp.int8)
    else:
        codes = jnp.full(shape, zero_index, jnp.uint8)
    return QuantizedArray(codes, jnp.zeros((num_blocks(size, block_size),), jnp.float32))
