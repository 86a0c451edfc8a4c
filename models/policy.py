"""Mixed-precision dtype policy: which dtype params are stored, computed and returned in.

The spec grammar is jmp's (Micikevicius et al., 2018, "Mixed Precision Training"; DeepMind's
jmp library), reimplemented here so ravine does not depend on jmp:

    "params=float32,compute=bfloat16,output=float32"   long keys and dtype names
    "p=f32,c=bf16,o=f32"                               short keys and dtype names
    "c=bf16"                                           params default to float32, compute
                                                       follows params, output follows compute
    "bf16", "full", "half"                             one dtype for all three

"full" is float32; "half" is bfloat16 on TPU and float16 elsewhere (as in jmp), so a "half"
policy on GPU/CPU needs loss scaling (`optim.DynamicLossScale`).

One key beyond jmp's: `matmul` (short `m`) chooses how `models.layers.Dense` multiplies.
"compute" (the default) multiplies in the compute dtype; "fp8" runs the matmul on float8
operands, e4m3 for inputs and kernels in the forward pass and e5m2 for the output gradient
in the backward pass, each tensor with one scale (per-tensor scaling), through flax's
`nn.Fp8DirectDotGeneralOp` (the successor of the deprecated `nn.Fp8DotGeneralOp`):

    "p=f32,c=bf16,o=f32,matmul=fp8"

flax's fp8 op scales with *delayed* scaling: the scale of step t comes from the largest
|value| (amax) of that tensor over the previous steps (a history of 1024), kept as variables
in the `_overwrite_with_gradient` collection (`FP8_COLLECTION`), whose "gradient" is the new
value. (torchao's float8 training recipe, the seed's, scales *dynamically*, from the amax of
the current tensor.) A train step must therefore differentiate with respect to that
collection too and store its gradient as is, never hand it to the optimizer (see
`experiments.demos.precision_limits.train_step`, flax's `TrainState.apply_gradients`).
"""
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax.linen import fp8_ops

# The flax collection holding fp8 scales and amax histories: overwritten by its "gradient",
# never updated by an optimizer.
FP8_COLLECTION = fp8_ops.OVERWRITE_WITH_GRADIENT
MATMULS = ("compute", "fp8")

_DTYPE_NAMES = {
    "float32": jnp.float32, "f32": jnp.float32, "full": jnp.float32, "single": jnp.float32,
    "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
    "float16": jnp.float16, "f16": jnp.float16,
    "float64": jnp.float64, "f64": jnp.float64, "double": jnp.float64,
}
_KEYS = {"params": "param_dtype", "p": "param_dtype",
         "compute": "compute_dtype", "c": "compute_dtype",
         "output": "output_dtype", "o": "output_dtype",
         "matmul": "matmul", "m": "matmul"}
_DTYPE_FIELDS = ("param_dtype", "compute_dtype", "output_dtype")


def _cast_floating(tree, dtype):
    """Casts every floating leaf of `tree` to `dtype`; integer, bool and other leaves pass."""

    def cast(leaf):
        if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating):
            return leaf.astype(dtype)
        return leaf

    return jax.tree.map(cast, tree)


@dataclasses.dataclass(frozen=True)
class Policy:
    """Dtypes for params (storage, e.g. fp32 master weights), compute and outputs.

    Hashable, so it can be a field of a flax module or a static jit argument. `matmul` is
    "compute" (matmuls in the compute dtype) or "fp8" (float8 matmuls with per-tensor
    delayed scaling, see the module docstring).
    """
    param_dtype: np.dtype = np.dtype(jnp.float32)
    compute_dtype: np.dtype = np.dtype(jnp.float32)
    output_dtype: np.dtype = np.dtype(jnp.float32)
    matmul: str = "compute"

    def __post_init__(self):
        for name in _DTYPE_FIELDS:
            dtype = np.dtype(getattr(self, name))
            if not jnp.issubdtype(dtype, jnp.floating):
                raise ValueError(f"{name} must be a floating dtype, got {dtype}")
            object.__setattr__(self, name, dtype)
        if self.matmul not in MATMULS:
            raise ValueError(f"matmul must be one of {list(MATMULS)}, got {self.matmul!r}")

    def cast_to_param(self, tree: Any) -> Any:
        """Casts the floating leaves of `tree` to the param dtype."""
        return _cast_floating(tree, self.param_dtype)

    def cast_to_compute(self, tree: Any) -> Any:
        """Casts the floating leaves of `tree` to the compute dtype."""
        return _cast_floating(tree, self.compute_dtype)

    def cast_to_output(self, tree: Any) -> Any:
        """Casts the floating leaves of `tree` to the output dtype."""
        return _cast_floating(tree, self.output_dtype)

    def __str__(self):
        matmul = "" if self.matmul == "compute" else f",matmul={self.matmul}"
        return (f"params={self.param_dtype.name},compute={self.compute_dtype.name},"
                f"output={self.output_dtype.name}{matmul}")


def _parse_dtype(name):
    if name == "half":
        return jnp.bfloat16 if jax.default_backend() == "tpu" else jnp.float16
    try:
        return _DTYPE_NAMES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r} in policy; known names: "
                         f"{', '.join(sorted(_DTYPE_NAMES) + ['half'])}") from None


def get_policy(spec: str | Policy) -> Policy:
    """Parses a jmp-style policy spec (see the module docstring) into a `Policy`.

    Args:
      spec: a string such as "params=float32,compute=bfloat16,output=float32" or
        "p=f32,c=bf16,o=f32" or a single dtype name ("full", "half", "bf16"), optionally
        with "matmul=fp8" ("m=fp8"), or a `Policy` (returned as is).

    Raises:
      ValueError naming an unknown key, an unknown dtype name, a repeated key or a malformed
      entry.

    Example:
      >>> import jax.numpy as jnp
      >>> from ravine.models import get_policy
      >>> policy = get_policy("p=f32,c=bf16")  # output follows compute
      >>> print(policy)
      params=float32,compute=bfloat16,output=bfloat16
      >>> policy.cast_to_compute({"x": jnp.ones(2), "ids": jnp.arange(2)})["x"].dtype
      dtype(bfloat16)
      >>> get_policy("p=f32,c=bf16,o=f32,m=fp8").matmul
      'fp8'
    """
    if isinstance(spec, Policy):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"policy must be a string like 'p=f32,c=bf16,o=f32' or a Policy, "
                         f"got {spec!r}")
    spec = spec.strip()
    if "=" not in spec:
        dtype = _parse_dtype(spec)
        return Policy(dtype, dtype, dtype)
    fields = {}
    for part in spec.split(","):
        key, sep, value = (s.strip() for s in part.partition("="))
        if not sep:
            raise ValueError(f"policy entry {part!r} in {spec!r} is not of the form key=dtype")
        if key not in _KEYS:
            raise ValueError(f"unknown policy key {key!r} in {spec!r}; the keys are "
                             "params (p), compute (c), output (o), matmul (m)")
        if _KEYS[key] in fields:
            raise ValueError(f"policy key {key!r} is given twice in {spec!r}")
        if _KEYS[key] == "matmul":
            if value not in MATMULS:
                raise ValueError(f"unknown matmul {value!r} in policy {spec!r}; known: "
                                 f"{', '.join(MATMULS)}")
            fields["matmul"] = value
            continue
        fields[_KEYS[key]] = _parse_dtype(value)
    param_dtype = fields.get("param_dtype", jnp.float32)
    compute_dtype = fields.get("compute_dtype", param_dtype)
    output_dtype = fields.get("output_dtype", compute_dtype)
    return Policy(param_dtype, compute_dtype, output_dtype, fields.get("matmul", "compute"))
