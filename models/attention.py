"""Causal multi-head attention kernels: `softmax(q k^T / sqrt(d) + causal mask) v`.

Three implementations of the same function, all taking `q, k, v` of shape
[batch, length, heads, head_dim] and returning that shape in `q`'s dtype, with the scores and
the softmax in float32:

- "xla": `jax.nn.dot_product_attention(implementation="xla")`; materialises the
  [batch, heads, length, length] scores.
- "cudnn": the same call with `implementation="cudnn"` (cuDNN's fused flash attention);
  needs a CUDA GPU and float16 / bfloat16 inputs.
- "chunked": FlashAttention in plain JAX (Dao et al., 2022, "FlashAttention"; Dao, 2023,
  "FlashAttention-2"; the online softmax of Milakov & Gimelshein, 2018): a `lax.scan` over
  blocks of keys keeps a running row maximum `m`, normaliser `l` and output accumulator,
  so memory is O(length * chunk_size) instead of O(length^2). The backward pass is a
  `custom_vjp` that recomputes each block's probabilities from the saved log-sum-exp
  instead of storing them, so gradients never hold the length x length matrix either.
  Every query row visits every key block (fully masked blocks included): simple, static
  shapes, about twice the FLOPs a causal kernel needs.

XLA:CPU has no float16 matmul with float32 accumulation, so on CPU float16 "xla" and
"chunked" attention run in float32 and cast the result back.
"""
import functools

import jax
import jax.numpy as jnp

IMPLEMENTATIONS = ("xla", "cudnn", "chunked")


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, implementation: str = "xla",
                     chunk_size: int = 128) -> jax.Array:
    """Causal scaled dot-product attention (Vaswani et al., 2017).

    `out[b, i, h] = sum_{j <= i} softmax_j(q[b, i, h] . k[b, j, h] / sqrt(head_dim)) v[b, j, h]`

    Args:
      q, k, v: [batch, length, heads, head_dim] arrays of one floating dtype.
      implementation: "xla", "cudnn" or "chunked" (see the module docstring).
      chunk_size: keys per block for "chunked" (ignored otherwise).

    Returns:
      [batch, length, heads, head_dim] in `q.dtype`.

    Raises:
      ValueError for an unknown implementation, or "cudnn" without a GPU or in float32.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention must be one of {list(IMPLEMENTATIONS)}, "
                         f"got {implementation!r}")
    if q.dtype == jnp.float16 and implementation != "cudnn" and jax.default_backend() == "cpu":
        # XLA:CPU rejects float16 dots with float32 accumulation (see the module docstring).
        upcast = (x.astype(jnp.float32) for x in (q, k, v))
        return causal_attention(*upcast, implementation, chunk_size).astype(q.dtype)
    if implementation == "chunked":
        return chunked_causal_attention(q, k, v, chunk_size)
    if implementation == "cudnn":
        if jax.default_backend() != "gpu":
            raise ValueError(f"attention='cudnn' needs a CUDA GPU, but the default backend is "
                             f"{jax.default_backend()!r}; use 'xla' or 'chunked'")
        if q.dtype not in (jnp.float16, jnp.bfloat16):
            raise ValueError(f"attention='cudnn' needs float16 or bfloat16 compute, got "
                             f"{q.dtype}; use a policy like 'p=f32,c=bf16,o=f32' or 'xla'")
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)


def _key_blocks(x, chunk_size):
    """[B, T, H, D] -> [T_padded / chunk_size, B, chunk_size, H, D], zero-padded at the end."""
    batch, length, heads, dim = x.shape
    n_blocks = -(-length // chunk_size)
    x = jnp.pad(x, ((0, 0), (0, n_blocks * chunk_size - length), (0, 0), (0, 0)))
    return x.reshape(batch, n_blocks, chunk_size, heads, dim).swapaxes(0, 1)


def _block_scores(q, k_block, block_index, chunk_size):
    """Scaled scores [B, H, T, C] of all queries against one key block, -inf where masked.

    Padded keys sit at positions >= T, after every query, so the causal mask hides them too.
    """
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k_block, preferred_element_type=jnp.float32)
    scores = scores / jnp.sqrt(jnp.float32(q.shape[-1]))
    query_pos = jnp.arange(q.shape[1])[:, None]
    key_pos = block_index * chunk_size + jnp.arange(chunk_size)[None, :]
    return jnp.where(key_pos <= query_pos, scores, -jnp.inf)


def _forward(q, k, v, chunk_size):
    """Online softmax over key blocks; returns the output and the row log-sum-exp [B,H,T]."""
    batch, length, heads, dim = q.shape
    chunk_size = min(chunk_size, length)

    def step(carry, block):
        row_max, row_sum, acc = carry
        k_block, v_block, index = block
        scores = _block_scores(q, k_block, index, chunk_size)
        new_max = jnp.maximum(row_max, scores.max(axis=-1))
        probs = jnp.exp(scores - new_max[..., None])
        rescale = jnp.exp(row_max - new_max)  # earlier blocks were normalised to the old max
        row_sum = row_sum * rescale + probs.sum(axis=-1)
        acc = acc * rescale[..., None] + jnp.einsum(
            "bhqk,bkhd->bhqd", probs.astype(v.dtype), v_block,
            preferred_element_type=jnp.float32)
        return (new_max, row_sum, acc), None

    k_blocks, v_blocks = _key_blocks(k, chunk_size), _key_blocks(v, chunk_size)
    init = (jnp.full((batch, heads, length), -jnp.inf, jnp.float32),
            jnp.zeros((batch, heads, length), jnp.float32),
            jnp.zeros((batch, heads, length, dim), jnp.float32))
    # Block 0 holds key 0, which every query sees, so row_max is finite after the first step.
    (row_max, row_sum, acc), _ = jax.lax.scan(
        step, init, (k_blocks, v_blocks, jnp.arange(k_blocks.shape[0])))
    out = (acc / row_sum[..., None]).swapaxes(1, 2).astype(q.dtype)
    return out, row_max + jnp.log(row_sum)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def chunked_causal_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                             chunk_size: int = 128) -> jax.Array:
    """Causal attention by FlashAttention's blockwise online softmax (see module docstring).

    Args:
      q, k, v: [batch, length, heads, head_dim].
      chunk_size: keys per block; memory grows as length * chunk_size.

    Returns:
      [batch, length, heads, head_dim] in `q.dtype`.
    """
    return _forward(q, k, v, chunk_size)[0]


def _chunked_fwd(q, k, v, chunk_size):
    out, logsumexp = _forward(q, k, v, chunk_size)
    return out, (q, k, v, out, logsumexp)


def _chunked_bwd(chunk_size, residuals, d_out):
    """FlashAttention-2's backward pass: per key block, `P = exp(S - lse)`, then
    `dV = P^T dO`, `dS = P * (dO V^T - rowsum(dO * O))`, `dQ += dS K / sqrt(d)`,
    `dK = dS^T Q / sqrt(d)`."""
    q, k, v, out, logsumexp = residuals
    length = q.shape[1]
    chunk_size = min(chunk_size, length)
    scale = 1.0 / jnp.sqrt(jnp.float32(q.shape[-1]))
    d_out_t = d_out.swapaxes(1, 2).astype(jnp.float32)  # [B, H, T, D]
    delta = jnp.sum(d_out_t * out.swapaxes(1, 2).astype(jnp.float32), axis=-1)  # [B, H, T]

    def step(d_q, block):
        k_block, v_block, index = block
        probs = jnp.exp(_block_scores(q, k_block, index, chunk_size) - logsumexp[..., None])
        d_v = jnp.einsum("bhqk,bhqd->bkhd", probs, d_out_t)
        d_probs = jnp.einsum("bhqd,bkhd->bhqk", d_out_t, v_block,
                             preferred_element_type=jnp.float32)
        d_scores = probs * (d_probs - delta[..., None]) * scale
        d_q = d_q + jnp.einsum("bhqk,bkhd->bqhd", d_scores, k_block,
                               preferred_element_type=jnp.float32)
        d_k = jnp.einsum("bhqk,bqhd->bkhd", d_scores, q, preferred_element_type=jnp.float32)
        return d_q, (d_k, d_v)

    k_blocks, v_blocks = _key_blocks(k, chunk_size), _key_blocks(v, chunk_size)
    d_q, (d_k, d_v) = jax.lax.scan(
        step, jnp.zeros(q.shape, jnp.float32),
        (k_blocks, v_blocks, jnp.arange(k_blocks.shape[0])))

    def unblock(blocks, like):  # [N, B, C, H, D] -> [B, T, H, D], padding dropped
        blocks = blocks.swapaxes(0, 1)
        merged = blocks.reshape(blocks.shape[0], -1, *blocks.shape[3:])
        return merged[:, :length].astype(like.dtype)

    return d_q.astype(q.dtype), unblock(d_k, k), unblock(d_v, v)


chunked_causal_attention.defvjp(_chunked_fwd, _chunked_bwd)
