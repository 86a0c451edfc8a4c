"""Loss scaling for float16 / bfloat16 training (Micikevicius et al., 2018, "Mixed Precision
Training").

Gradients of a low-precision loss underflow when small; multiplying the loss by a scale
before differentiating and dividing the gradients by it afterwards keeps them
representable. A loss scale is an immutable pytree (its scale and counter are array leaves,
its settings static), so it passes through `jit`, lives in the train state and is
checkpointed with it:

    loss, grads = jax.value_and_grad(lambda p: loss_scale.scale(loss_fn(p)))(params)
    grads = loss_scale.unscale(grads)
    finite = all_finite(grads)
    loss_scale = loss_scale.adjust(finite)
    params, opt_state = select_tree(finite, (new_params, new_opt_state), (params, opt_state))
"""
from typing import Any

import jax
import jax.numpy as jnp
import optax

from ravine.optim import _validate


def _apply_floating(op, tree, loss_scale):
    """`op(leaf, loss_scale)` on every floating leaf, in at least float32, keeping its dtype.

    Working in float32 keeps a scale above float16's largest value (65504) from turning
    into inf by itself; non-floating leaves pass through unchanged.
    """

    def apply(leaf):
        leaf = jnp.asarray(leaf)
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            return leaf
        compute_dtype = jnp.promote_types(leaf.dtype, jnp.float32)
        out = op(leaf.astype(compute_dtype), loss_scale.astype(compute_dtype))
        return out.astype(leaf.dtype)

    return jax.tree.map(apply, tree)


class _LossScale:
    """Pytree plumbing: `_leaf_fields` are array leaves, `_static_fields` hashable settings."""

    __slots__ = ()
    _leaf_fields = ()
    _static_fields = ()

    def _set(self, **fields):
        for name, value in fields.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name, value):
        raise AttributeError(f"{type(self).__name__} is immutable; adjust() returns a new one")

    def _replace(self, **fields):
        new = object.__new__(type(self))
        new._set(**{name: getattr(self, name) for name in self._leaf_fields + self._static_fields})
        new._set(**fields)
        return new

    def tree_flatten_with_keys(self):
        children = [(jax.tree_util.GetAttrKey(name), getattr(self, name))
                    for name in self._leaf_fields]
        return children, tuple(getattr(self, name) for name in self._static_fields)

    @classmethod
    def tree_unflatten(cls, static, leaves):
        # No validation here: under jit the leaves are tracers or placeholders.
        new = object.__new__(cls)
        new._set(**dict(zip(cls._leaf_fields, leaves)), **dict(zip(cls._static_fields, static)))
        return new

    def __repr__(self):
        fields = ", ".join(f"{name}={getattr(self, name)!r}"
                           for name in self._leaf_fields + self._static_fields)
        return f"{type(self).__name__}({fields})"

    def scale(self, tree: Any) -> Any:
        """Multiplies every floating leaf of `tree` (usually the loss) by the loss scale."""
        return _apply_floating(jnp.multiply, tree, self.loss_scale)

    def unscale(self, tree: Any) -> Any:
        """Divides every floating leaf of `tree` (usually the gradients) by the loss scale."""
        return _apply_floating(jnp.divide, tree, self.loss_scale)

    def adjust(self, grads_finite: jax.typing.ArrayLike) -> "_LossScale":
        """The loss scale for the next step; a fixed scale returns itself."""
        del grads_finite
        return self


@jax.tree_util.register_pytree_with_keys_class
class NoOpLossScale(_LossScale):
    """No loss scaling: `scale` and `unscale` return the tree unchanged (float32 / bfloat16)."""

    __slots__ = ()

    @property
    def loss_scale(self) -> jax.Array:
        return jnp.ones((), jnp.float32)

    def scale(self, tree: Any) -> Any:
        return tree

    def unscale(self, tree: Any) -> Any:
        return tree


@jax.tree_util.register_pytree_with_keys_class
class StaticLossScale(_LossScale):
    """A fixed loss scale: gradients are scaled by `scale` at every step.

    Args:
      scale: the loss scale, a finite number > 0 (a power of two keeps unscaling exact).
    """

    __slots__ = ("loss_scale",)
    _leaf_fields = ("loss_scale",)

    def __init__(self, scale: float):
        _validate.greater_than("scale", scale, 0)
        self._set(loss_scale=jnp.asarray(scale, jnp.float32))


@jax.tree_util.register_pytree_with_keys_class
class DynamicLossScale(_LossScale):
    """A loss scale that adapts to overflow (Micikevicius et al., 2018).

    `adjust(grads_finite)`: on non-finite gradients the scale is divided by `factor` (never
    below `min_scale`) and the counter of finite steps restarts; after `period`
    consecutive finite steps the scale is multiplied by `factor` (unless that overflows
    float32) and the counter restarts. The train step should skip updates whose gradients
    are not finite (see `select_tree`).

    Args:
      scale: initial loss scale, a finite number >= min_scale.
      period: number of consecutive finite steps before the scale grows.
      factor: growth / shrink factor, > 1.
      min_scale: lower bound of the scale, > 0.

    Example:
      >>> import jax.numpy as jnp
      >>> from ravine.optim.loss_scale import DynamicLossScale
      >>> loss_scale = DynamicLossScale(scale=8.0, period=2)
      >>> loss_scale = loss_scale.adjust(jnp.array(False))  # overflow: halve
      >>> float(loss_scale.loss_scale)
      4.0
      >>> for _ in range(2):  # `period` finite steps: double
      ...   loss_scale = loss_scale.adjust(jnp.array(True))
      >>> float(loss_scale.loss_scale)
      8.0
    """

    __slots__ = ("loss_scale", "counter", "period", "factor", "min_scale")
    _leaf_fields = ("loss_scale", "counter")
    _static_fields = ("period", "factor", "min_scale")

    def __init__(self, scale: float = 2.0 ** 15, period: int = 2000, factor: float = 2.0,
                 min_scale: float = 1.0):
        _validate.greater_than("scale", scale, 0)
        _validate.positive_int("period", period)
        _validate.greater_than("factor", factor, 1)
        _validate.greater_than("min_scale", min_scale, 0)
        if scale < min_scale:
            raise ValueError(f"scale must be >= min_scale ({min_scale}), got {scale!r}")
        self._set(loss_scale=jnp.asarray(scale, jnp.float32),
                  counter=jnp.zeros((), jnp.int32),
                  period=period, factor=float(factor), min_scale=float(min_scale))

    def adjust(self, grads_finite: jax.typing.ArrayLike) -> "DynamicLossScale":
        """Returns the loss scale for the next step given whether this step's grads were finite."""
        finite = jnp.asarray(grads_finite, bool)
        finite_steps = self.counter + 1
        grow = finite & (finite_steps >= self.period)
        grown = self.loss_scale * self.factor
        grown = jnp.where(jnp.isfinite(grown), grown, self.loss_scale)
        shrunk = jnp.maximum(self.loss_scale / self.factor, self.min_scale)
        loss_scale = jnp.where(finite, jnp.where(grow, grown, self.loss_scale), shrunk)
        counter = jnp.where(finite & ~grow, finite_steps, 0)
        return self._replace(loss_scale=loss_scale, counter=counter)


def all_finite(tree: Any) -> jax.Array:
    """A scalar bool array: True when every element of every floating leaf is finite."""
    checks = [jnp.isfinite(leaf).all() for leaf in jax.tree.leaves(tree)
              if jnp.issubdtype(jnp.result_type(leaf), jnp.floating)]
    if not checks:
        return jnp.array(True)
    return jnp.stack(checks).all()


def select_tree(pred: jax.typing.ArrayLike, on_true: Any, on_false: Any) -> Any:
    """`on_true` if the scalar bool `pred` else `on_false`, leaf by leaf, without a host sync.

    Used to skip a step with non-finite gradients: keep the old params and optimizer state.
    """
    return optax.tree.where(pred, on_true, on_false)
