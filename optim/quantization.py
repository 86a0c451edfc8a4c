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

Encoding is O(1) arithmetic per value, with no search and no table read (XLA fuses it
with the optimizer's arithmetic): log10 gives the exponent group, the place in the group
gives a candidate code within one of the nearest, and comparing with the midpoints to its
neighbours picks the nearest code (as a 256-way argmin would). Decoding computes the code
value from its index the same way.

References:
  Dettmers et al., 2022, "8-bit Optimizers via Block-wise Quantization",
  https://arxiv.org/abs/2110.02861; Dettmers, 2016, "8-Bit Approximations for Parallelism
  in Deep Learning", https://arxiv.org/abs/1511.04561
"""
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

EXPONENT_BITS = 7  # exponents 10^0 .. 10^-6
_TINY = np.finfo(np.float32).tiny  # blocks whose absmax is below this are stored as zeros


def dynamic_code_map(signed: bool) -> np.ndarray:
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


def _floor_log2(m):
    """floor(log2(m)) of positive int32s below 2^24, from the float32 exponent (exact)."""
    return (jax.lax.bitcast_convert_type(m.astype(jnp.float32), jnp.int32) >> 23) - 127


def _power_of_two_inverse(x):
    """1 / x for float32 powers of two, exact, without a division (XLA treats divisions as
    expensive and then stores the codec's results instead of fusing them into their users)."""
    bits = jax.lax.bitcast_convert_type(x, jnp.int32)
    return jax.lax.bitcast_convert_type(jnp.int32(254 << 23) - bits, jnp.float32)


def _decade_scale(group):
    """10^(group - 6) for int32 groups 0..6 (selects, no table)."""
    scale = jnp.float32(10.0 ** -6)
    for e in range(1, EXPONENT_BITS):
        scale = jnp.where(group >= e, jnp.float32(10.0 ** (e - 6)), scale)
    return scale


def _magnitude(rank, signed):
    """The code magnitude of rank 0 (zero) .. top rank (1.0) among the non-negative codes.

    Sorted, the positive codes run through the exponents 10^-6 .. 10^0 in groups of 2^g
    values (signed; 2^(g+1) unsigned), each the midpoint of one of equal intervals of
    [0.1, 1]; 0 and 1 are the two special codes.
    """
    shift = 0 if signed else 1
    top = 128 if signed else 255
    safe = jnp.clip(rank, 1, top - 1)
    group = _floor_log2(safe + shift) - shift  # group g holds ranks [2^(g+s) - s, ...)
    group_start = jnp.left_shift(1, group + shift)
    inverse_size = _power_of_two_inverse(group_start.astype(jnp.float32))
    position = (safe + shift - group_start).astype(jnp.float32)
    value = _decade_scale(group) * (0.1 + 0.9 * (position + 0.5) * inverse_size)
    return jnp.where(rank <= 0, 0.0, jnp.where(rank >= top, 1.0, value))


def encode(normalized: jax.Array, signed: bool, keep_nonzero: bool = False) -> jax.Array:
    """Index of the nearest code value for each float32 in [-1, 1] (uint8).

    O(1) arithmetic, no search and no table: six comparisons give the exponent group, the
    place in the group gives the nearest code of that group, and at the group's two ends
    the midpoint to the neighbouring group's code settles it. (Exact ties may round either
    way.) With `keep_nonzero`, a nonzero value gets the nearest nonzero code (the smallest
    one of its sign where the nearest is 0).
    """
    y = normalized.astype(jnp.float32)
    a = jnp.abs(y)
    shift = 0 if signed else 1
    # Group g holds the codes 10^(g-6) * [0.1, 1]: the last decade threshold a reaches.
    scale, inverse_scale = jnp.float32(1e-6), jnp.float32(1e6)
    size = jnp.float32(2.0 ** shift)
    for e in range(1, EXPONENT_BITS):
        reached = a >= np.float32(10.0 ** (e - 7))
        scale = jnp.where(reached, np.float32(10.0 ** (e - 6)), scale)
        inverse_scale = jnp.where(reached, np.float32(10.0 ** (6 - e)), inverse_scale)
        size = jnp.where(reached, np.float32(2.0 ** (e + shift)), size)
    # Codes of the group are the midpoints of `size` equal intervals of [0.1, 1] (scaled):
    # the interval holding a gives the nearest of them.
    place = jnp.clip(jnp.floor((a * inverse_scale - 0.1) * (size * np.float32(1 / 0.9))),
                     0, size - 1)
    inverse_size = _power_of_two_inverse(size)
    here = scale * (0.1 + 0.9 * (place + 0.5) * inverse_size)
    # At the ends, the neighbour is the next group's last code below (0 below the lowest
    # group) or its first code above (1 above the top group).
    below = jnp.where(scale == np.float32(1e-6), 0.0, 0.1 * scale * (1 - 0.9 * inverse_size))
    above = jnp.where(scale == 1, 1.0, scale * (1 + 2.25 * inverse_size))
    step_down = (place == 0) & (a < (below + here) / 2)
    step_up = (place == size - 1) & (a >= (here + above) / 2)
    rank = (size - shift + place).astype(jnp.int32) - step_down + step_up
    if keep_nonzero:
        rank = jnp.where(a > 0, jnp.maximum(rank, 1), rank)
    if signed:  # among the non-negative codes; the signed map has no -1
        return jnp.where(y >= 0, 127 + rank, 127 - jnp.minimum(rank, 127)).astype(jnp.uint8)
    return rank.astype(jnp.uint8)


def decode(indices: jax.Array, signed: bool) -> jax.Array:
    """The code values at `indices` (float32), computed from the index (no table read)."""
    i = indices.astype(jnp.int32)
    if not signed:
        return _magnitude(i, False)
    magnitude = _magnitude(jnp.abs(i - 127), True)
    return jnp.where(i < 127, -magnitude, magnitude)


class QuantizedArray(NamedTuple):
    """An array stored as 8-bit codes with one float32 scale per block.

    `codes` has the array's shape (int8 for signed maps, uint8 for unsigned), so it shards
    like the array; `scales` has one absmax per block of `block_size` consecutive values.
    """
    codes: jax.Array
    scales: jax.Array


def to_blocks(x: jax.Array, block_size: int) -> jax.Array:
    """`x` flattened, zero-padded and reshaped to `[num_blocks, block_size]`."""
    flat = x.reshape(-1)
    pad = -flat.size % block_size
    if pad:
        flat = jnp.pad(flat, (0, pad))
    return flat.reshape(-1, block_size)


def from_blocks(blocks: jax.Array, shape: Sequence[int]) -> jax.Array:
    """The inverse of `to_blocks`: the first `prod(shape)` values, reshaped to `shape`."""
    return blocks.reshape(-1)[:int(np.prod(shape))].reshape(shape)


def num_blocks(size: int, block_size: int) -> int:
    return -(-size // block_size)


def quantize(x: jax.Array, block_size: int, signed: bool,
             keep_nonzero: bool = False) -> QuantizedArray:
    """Block-wise dynamic quantization of `x` (any shape) -> `QuantizedArray`.

    Each value gets the nearest code of its block; with `keep_nonzero` a nonzero value gets
    the nearest nonzero code, so that only zeros dequantize to zero (see `encode`).
    """
    return quantize_blocks(to_blocks(x.astype(jnp.float32), block_size), x.shape, signed,
                           keep_nonzero)


def quantize_blocks(blocks: jax.Array, shape: Sequence[int], signed: bool,
                    keep_nonzero: bool = False) -> QuantizedArray:
    """`quantize` of the array of `shape` whose `to_blocks` are `blocks` (float32)."""
    absmax = jnp.max(jnp.abs(blocks), axis=1)
    usable = absmax >= _TINY
    scales = jnp.where(usable, absmax, 0.0)
    inverse = jnp.where(usable, 1.0 / jnp.where(usable, absmax, 1.0), 0.0)
    indices = from_blocks(encode(blocks * inverse[:, None], signed, keep_nonzero), shape)
    if signed:  # int8 codes: index 128 (the smallest positive value) is code 0
        codes = (indices.astype(jnp.int32) - 128).astype(jnp.int8)
    else:
        codes = indices
    return QuantizedArray(codes, scales)


def dequantize(quantized: QuantizedArray, block_size: int, signed: bool) -> jax.Array:
    """The float32 array `quantized` stands for."""
    return from_blocks(dequantize_blocks(quantized, block_size, signed), quantized.codes.shape)


def dequantize_blocks(quantized: QuantizedArray, block_size: int, signed: bool) -> jax.Array:
    """`to_blocks` of `dequantize(quantized)`: `[num_blocks, block_size]` float32."""
    codes, scales = quantized
    indices = codes.astype(jnp.int32) + 128 if signed else codes
    return to_blocks(decode(indices, signed), block_size) * scales[:, None]


def zeros(shape: Sequence[int], block_size: int, signed: bool) -> QuantizedArray:
    """The `QuantizedArray` of zeros of `shape` (`quantize(jnp.zeros(shape))`, allocated
    directly)."""
    size = int(np.prod(shape))
    zero_index = int(np.searchsorted(dynamic_code_map(signed), 0.0))
    if signed:
        codes = jnp.full(shape, zero_index - 128, jnp.int8)
    else:
        codes = jnp.full(shape, zero_index, jnp.uint8)
    return QuantizedArray(codes, jnp.zeros((num_blocks(size, block_size),), jnp.float32))
