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
"""
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_DTYPE_NAMES = {
    "float32": jnp.float32, "f32": jnp.float32, "full": jnp.float32, "single": jnp.float32,
    "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
    "float16": jnp.float16, "f16": jnp.float16,
    "float64": jnp.float64, "f64": jnp.float64, "double": jnp.float64,
}
_KEYS = {"params": "param_dtype", "p": "param_dtype",
         "compute": "compute_dtype", "c": "compute_dtype",
         "output": "output_dtype", "o": "output_dtype"}


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

    Hashable, so it can be a field of a flax module or a static jit argument.
    """
    param_dtype: np.dtype = np.dtype(jnp.float32)
    compute_dtype: np.dtype = np.dtype(jnp.float32)
    output_dtype: np.dtype = np.dtype(jnp.float32)

    def __post_init__(self):
        for field in dataclasses.fields(self):
            dtype = np.dtype(getattr(self, field.name))
            if not jnp.issubdtype(dtype, jnp.floating):
                raise ValueError(f"{field.name} must be a floating dtype, got {dtype}")
            object.__setattr__(self, field.name, dtype)

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
        return (f"params={self.param_dtype.name},compute={self.compute_dtype.name},"
                f"output={self.output_dtype.name}")


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
        "p=f32,c=bf16,o=f32" or a single dtype name ("full", "half", "bf16"), or a `Policy`
        (returned as is).

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
    dtypes = {}
    for part in spec.split(","):
        key, sep, value = (s.strip() for s in part.partition("="))
        if not sep:
            raise ValueError(f"policy entry {part!r} in {spec!r} is not of the form key=dtype")
        if key not in _KEYS:
            raise ValueError(f"unknown policy key {key!r} in {spec!r}; the keys are "
                             "params (p), compute (c), output (o)")
        if _KEYS[key] in dtypes:
            raise ValueError(f"policy key {key!r} is given twice in {spec!r}")
        dtypes[_KEYS[key]] = _parse_dtype(value)
    param_dtype = dtypes.get("param_dtype", jnp.float32)
    compute_dtype = dtypes.get("compute_dtype", param_dtype)
    output_dtype = dtypes.get("output_dtype", compute_dtype)
    return Policy(param_dtype, compute_dtype, output_dtype)
