"""Parameter counts and training FLOPs per token, for model-FLOPs-utilisation (MFU).

Training FLOPs per token follow Kaplan et al. (2020, "Scaling Laws for Neural Language
Models", Table 1) and PaLM (Chowdhery et al., 2022, Appendix B), as nanoGPT's MFU estimate:
a forward pass costs 2 FLOPs per weight that multiplies an activation plus the attention
scores and weighted sum, and a backward pass twice the forward, so

    flops_per_token = 6 * (N + d_model * vocab) + 12 * n_layers * d_model * seq_len

- N = `non_embedding_params(config)`: every param outside the token embedding, the learned
  position table and the output head, i.e. the blocks' matrices and norm gains and the
  final norm (Kaplan's "non-embedding parameters"; the gains are ~0.1% of N).
- d_model * vocab is the output head (the "de-embedding" matmul), counted whether or not it
  is tied to the token embedding. The embedding lookup and position table are gathers and
  cost no FLOPs.
- 12 * n_layers * d_model * seq_len is QK^T and the attention-weighted sum of V (each
  2 * seq_len * d_model per token forward, x3 for training), counted over the full
  seq_len x seq_len square as PaLM does, although a causal mask needs only half of it.

Elementwise work (norms, softmax, activations, the optimizer) is not counted: MFU measures
useful matmul work, so those show up as lost utilisation.
"""
import math
from typing import Any

import jax
from flax import linen as nn

from ravine.models.transformer import GATED_MLPS, TransformerConfig


def count_params(params: Any) -> int:
    """Total number of scalars in a params tree (boxed or unboxed, arrays or shape structs).

    Works on `model.init(...)` output, its `nn.unbox`, a `{"params": ...}` variables dict or
    a `jax.eval_shape` of any of them.

    Example:
      >>> import jax.numpy as jnp
      >>> from ravine.models import count_params
      >>> count_params({"dense": {"kernel": jnp.zeros((3, 4)), "bias": jnp.zeros(4)}})
      16
    """
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(nn.unbox(params)))


def non_embedding_params(config: TransformerConfig) -> int:
    """N: params of a `Transformer(config)` other than the embedding, positions and head.

    Per block: Q, K, V and output projections (4 d^2), the MLP (2 d d_ff for the non-gated
    variants "relu", "gelu", "swish"; 3 d d_ff for the gated ones "glu", "bilinear",
    "geglu", "swiglu", "reglu") and two norms (d gains each, plus d biases for
    "layernorm"); plus the final norm.
    """
    d = config.d_model
    norm_params = d if config.norm == "rmsnorm" else 2 * d
    mlp_matrices = 3 if config.mlp in GATED_MLPS else 2
    block = 4 * d * d + mlp_matrices * d * config.ff_dim + 2 * norm_params
    return config.n_layers * block + norm_params


def flops_per_token(config: TransformerConfig, seq_len: int | None = None) -> int:
    """Training FLOPs (forward + backward) per token of a `Transformer(config)`.

    `6 * (N + d_model * vocab) + 12 * n_layers * d_model * seq_len` (see the module
    docstring for what is counted).

    Args:
      config: a `TransformerConfig`.
      seq_len: the training sequence length (default: `config.max_len`).

    Example:
      >>> from ravine.models import TransformerConfig, flops_per_token
      >>> flops_per_token(TransformerConfig(vocab_size=256, d_model=64, n_layers=2, max_len=32))
      788352
    """
    seq_len = config.max_len if seq_len is None else seq_len
    matmul_params = non_embedding_params(config) + config.d_model * config.vocab_size
    return 6 * matmul_params + 12 * config.n_layers * config.d_model * seq_len


def recompute_flops_per_token(config: TransformerConfig, seq_len: int | None = None) -> int:
    """FLOPs per token that `config.remat` adds by recomputing activations in the backward pass.

    "none": 0; "block": one forward pass of the blocks, `2 N + 4 n_layers d_model seq_len`
    (N = `non_embedding_params`), at any `remat_every`; "dots" keeps the weight matmuls'
    outputs and recomputes the attention's score and weighted-sum matmuls (the
    dot_generals with batch dimensions), `4 n_layers d_model seq_len`. Elementwise recomputation is not counted (as
    `flops_per_token` counts no elementwise work).

    Example:
      >>> import dataclasses
      >>> from ravine.models import TransformerConfig
      >>> from ravine.models.accounting import recompute_flops_per_token
      >>> c = TransformerConfig(vocab_size=256, d_model=64, n_layers=2, max_len=32)
      >>> [recompute_flops_per_token(dataclasses.replace(c, remat=r)) for r in ("none", "dots")]
      [0, 16384]
    """
    seq_len = config.max_len if seq_len is None else seq_len
    attention = 4 * config.n_layers * config.d_model * seq_len
    if config.remat == "none":
        return 0
    if config.remat == "dots":
        return attention
    return 2 * non_embedding_params(config) + attention


def hardware_flops_per_token(config: TransformerConfig, seq_len: int | None = None) -> int:
    """FLOPs per token the hardware runs: `flops_per_token` plus the recomputation of
    `config.remat` (`recompute_flops_per_token`). Hardware FLOPs utilisation (HFU) divides
    this by the peak where model FLOPs utilisation (MFU) divides `flops_per_token`
    (Chowdhery et al. 2022, PaLM, Appendix B; Korthikanti et al. 2022, Section 6).

    Example:
      >>> import dataclasses
      >>> from ravine.models import TransformerConfig
      >>> from ravine.models.accounting import hardware_flops_per_token
      >>> c = TransformerConfig(vocab_size=256, d_model=64, n_layers=2, max_len=32)
      >>> round(hardware_flops_per_token(dataclasses.replace(c, remat="block"))
      ...       / flops_per_token(c), 3)
      1.292
    """
    return flops_per_token(config, seq_len) + recompute_flops_per_token(config, seq_len)
