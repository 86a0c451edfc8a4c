"""The language-modelling loss, always in float32."""
import jax.numpy as jnp
import optax


def cross_entropy(logits, targets):
    """Mean next-token cross-entropy `-mean log softmax(logits)[targets]`, in float32.

    Args:
      logits: [..., vocab] in any floating dtype (upcast to float32 before the softmax, so a
        bf16 / fp16 compute policy does not lose precision in the loss).
      targets: integer token ids of shape `logits.shape[:-1]`.

    Returns:
      A float32 scalar.
    """
    losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
    return losses.mean()
