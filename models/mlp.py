"""A multilayer perceptron with a dtype policy and logically named params."""
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from ravine.models.layers import Dense
from ravine.models.policy import Policy, get_policy


class MLP(nn.Module):
    """`x -> W_n(act(... act(W_1 x + b_1) ...)) + b_n`: Dense layers with `activation` between.

    Params are stored in the policy's param dtype, the layers computed in its compute dtype
    and the result returned in its output dtype. Kernels alternate Megatron-style between
    ("embed", "mlp") (column-parallel) and ("mlp", "embed") (row-parallel), so a tensor-
    parallel MLP needs one all-reduce per pair of layers.

    Attributes:
      features: the width of each layer, the last one being the output size.
      activation: the nonlinearity between layers (not after the last one).
      policy: a `Policy` or spec string (see `models.get_policy`).
      use_bias: whether the layers have biases.
    """
    features: Sequence[int]
    activation: Callable[[jnp.ndarray], jnp.ndarray] = nn.gelu
    policy: Policy | str = "params=float32,compute=float32,output=float32"
    use_bias: bool = True

    def __post_init__(self):
        widths = tuple(self.features)
        if not widths or not all(isinstance(w, int) and not isinstance(w, bool) and w > 0
                                 for w in widths):
            raise ValueError(f"features must be a non-empty sequence of positive integers, "
                             f"got {self.features!r}")
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        policy = get_policy(self.policy)
        x = policy.cast_to_compute(x)
        for i, width in enumerate(self.features):
            names = ("embed", "mlp") if i % 2 == 0 else ("mlp", "embed")
            x = Dense((width,), names, policy, nn.initializers.lecun_normal(),
                      use_bias=self.use_bias, name=f"dense_{i}")(x)
            if i < len(self.features) - 1:
                x = self.activation(x)
        return policy.cast_to_output(x)
