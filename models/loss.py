"""The language-modelling loss, always in float32, with PaLM's optional z-loss."""
import jax
import jax.numpy as jnp
import optax


def lm_loss(logits: jax.Array, targets: jax.Array,
            z_loss: jax.typing.ArrayLike = 0.0) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Next-token cross-entropy plus `z_loss * mean(log(Z)^2)`, and both terms as metrics.

    `Z = sum_v exp(logits_v)` is the softmax normaliser of each position. The z-loss pulls
    log Z towards 0, which keeps the output logits from drifting to large magnitudes where
    float rounding and loss divergence set in (Chowdhery et al. 2022, PaLM, coefficient
    1e-4; Wortsman et al. 2023 find it removes the output-logit divergence at high lr).

    Args:
      logits: [..., vocab] in any floating dtype (upcast to float32 before the softmax, so
        a bf16 / fp16 compute policy does not lose precision in the loss).
      targets: integer token ids of shape `logits.shape[:-1]`.
      z_loss: the coefficient (>= 0); 0 adds nothing (the metric is still reported).

    Returns:
      `(loss, metrics)`: the float32 scalar to minimise, `mean(CE) + z_loss * mean(log Z^2)`,
      and `{"cross_entropy": mean(CE), "z_loss": z_loss * mean(log Z^2),
      "log_z_sq": mean(log Z^2)}`, float32 scalars.

    Raises:
      ValueError: for a negative or non-finite Python `z_loss`.

    References:
      Chowdhery et al. 2022, "PaLM", https://arxiv.org/abs/2204.02311 (section 5);
      Wortsman et al. 2023, https://arxiv.org/abs/2309.14322
    """
    if isinstance(z_loss, (int, float)) and not (0 <= z_loss < float("inf")):
        raise ValueError(f"z_loss must be a finite number >= 0, got {z_loss!r}")
    logits = logits.astype(jnp.float32)
    cross_entropy_ = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
    log_z_sq = jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2)
    z_term = z_loss * log_z_sq
    metrics = {"cross_entropy": cross_entropy_, "z_loss": z_term, "log_z_sq": log_z_sq}
    return cross_entropy_ + z_term, metrics


def cross_entropy(logits: jax.Array, targets: jax.Array,
                  z_loss: jax.typing.ArrayLike = 0.0) -> jax.Array:
    """Mean next-token cross-entropy `-mean log softmax(logits)[targets]`, in float32.

    With `z_loss > 0`, adds `z_loss * mean(log(Z)^2)` (see `lm_loss`, which also returns
    the two terms separately for logging).

    Args:
      logits: [..., vocab] in any floating dtype (upcast to float32 before the softmax, so a
        bf16 / fp16 compute policy does not lose precision in the loss).
      targets: integer token ids of shape `logits.shape[:-1]`.
      z_loss: the z-loss coefficient, default 0 (plain cross-entropy).

    Returns:
      A float32 scalar.
    """
    if isinstance(z_loss, (int, float)) and z_loss == 0:
        logits = logits.astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
    return lm_loss(logits, targets, z_loss)[0]
