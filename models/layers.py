"""A dense layer whose params carry logical axis names (for `sharding.RULES`) and a policy.

Megatron-LM layout (Shoeybi et al., 2019): a first matmul ("embed", "mlp") is column-parallel
and the second ("mlp", "embed") row-parallel, so a pair needs one all-reduce; the sharding
rules, not the model, decide which mesh axis each logical name lands on.
"""
from collections.abc import Callable, Sequence
from typing import Any

import jax
from flax import linen as nn

from ravine.models.policy import Policy


def logical_init(init: Callable[..., jax.Array], names: Sequence[str]) -> Callable[..., Any]:
    """`init` whose params are boxed with the logical axis `names` (one per dimension)."""
    return nn.with_logical_partitioning(init, names)


class Dense(nn.Module):
    """`y = x . W (+ b)` contracting the last `contract` axes of x, in the compute dtype.

    The kernel has shape `x.shape[-contract:] + features` and is created at that shape (not
    reshaped from a matrix), so its logical `names` hold also while a mesh and rules are
    active. Params are stored in the policy's param dtype.

    Attributes:
      features: output dims, e.g. `(heads, head_dim)`.
      names: logical axis names of the kernel, inputs first then outputs; the bias (if any)
        is named after the output dims.
      policy: the dtype policy; with `policy.matmul == "fp8"` the matmul runs in float8
        (flax's `nn.Fp8DirectDotGeneralOp`, a child named "fp8" whose scales live in the
        `FP8_COLLECTION` variables, see `models.policy`).
      kernel_init: an unboxed initializer; `names` are attached here.
      contract: how many trailing input axes are contracted.
      use_bias: add a zero-initialised bias.
    """
    features: Sequence[int]
    names: Sequence[str]
    policy: Policy
    kernel_init: Callable
    contract: int = 1
    use_bias: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        features = tuple(self.features)
        kernel = self.param("kernel", logical_init(self.kernel_init, tuple(self.names)),
                            x.shape[x.ndim - self.contract:] + features,
                            self.policy.param_dtype)
        x, kernel = self.policy.cast_to_compute((x, kernel))
        contracting = (tuple(range(x.ndim - self.contract, x.ndim)), tuple(range(self.contract)))
        if self.policy.matmul == "fp8":
            # flax's op quantizes x and kernel to e4m3 and the output gradient to e5m2, each
            # with a per-tensor scale kept in the FP8_COLLECTION (delayed scaling).
            y = nn.Fp8DirectDotGeneralOp(name="fp8")(x, kernel, (contracting, ((), ())))
        else:
            y = jax.lax.dot_general(x, kernel, (contracting, ((), ())))
        if self.use_bias:
            bias = self.param("bias", logical_init(nn.initializers.zeros_init(),
                                                   tuple(self.names)[-len(features):]),
                              features, self.policy.param_dtype)
            y = y + self.policy.cast_to_compute(bias)
        return y
