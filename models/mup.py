"""μP's per-parameter learning-rate multipliers for `models.Transformer`.

Tensor Programs V (Yang et al. 2022), Table 3, Adam family, with the readout in the
MuReadout form (output multiplier 1/r, r = d_model / base_width), which the model applies
itself under `parametrization="mup"`:

| kind       | params                                   | init std        | lr      |
|------------|------------------------------------------|-----------------|---------|
| embedding  | token embedding, learned positions       | init_std        | lr      |
| hidden     | attention q/k/v/out, MLP up/gate/down    | init_std/sqrt(r)| lr / r  |
| readout    | the head (input multiplied by 1/r)       | init_std        | lr      |
| vector     | norm scales and biases (QK-norm included)| 1 / 0           | lr      |

Apply the lr column with `optim.scale_by_multipliers` after any optimizer:

    params = nn.unbox(model.init(key, tokens))["params"]
    tx = optax.chain(optim.adamw(lr, weight_decay=0.1, mask=optim.decay_mask),
                     optim.scale_by_multipliers(models.mup_lr_multipliers(params, config)))

Weight decay. Placed last, the multiplier scales the whole step, decay included: an
lr-scaled decay `lr * wd * w` becomes `lr/r * wd * w` on hidden matrices, as the mup
package's MuAdam (it scales each group's lr; PyTorch's AdamW decays by lr * wd).

Other optimizers (checked in tests/test_mup.py on rank-1 gradients, the case μP's 1/r is
derived for: an Adam step on a rank-1 gradient n x n has spectral norm lr * n, ∝ width):
- Shampoo with grafting (default "adam") takes Adam's step norm per block, and on a rank-1
  gradient its step is as large as Adam's (measured 0.94x): it follows the Adam table,
  `optimizer="shampoo"` gives the same multipliers as "adam".
- Muon orthogonalises its step and scales it by the matrix's shape, so the spectral norm
  of a hidden matrix's update does not grow with width (Yang, Simon & Bernstein's spectral
  condition): `optimizer="muon"` gives multiplier 1 everywhere (Muon's AdamW leaves,
  embeddings, head and vectors, have 1 anyway). A hidden matrix that your `muon_mask` sends
  to AdamW instead (e.g. a 3-D attention kernel, where Muon takes only 2-D leaves) wants
  the Adam table's 1/r: build its multipliers with `optimizer="adam"`.
- SOAP runs Adam in the eigenbasis of the gradient statistics, where a rank-1 gradient has
  one nonzero coordinate, so in exact arithmetic its step's spectral norm is lr * O(1) at
  every width, like Muon's, and `optimizer="soap"` gives multiplier 1. Not tested: with
  the official SOAP update (eps on sqrt(v), bias correction in the step size) an exactly
  rank-1 gradient leaves the statistics' null space to round-off, which Adam's division
  scales to O(1) coordinates (measured step norms 10.0 / 29.0 / 20.8 at widths 32 / 64 /
  128, 4 steps, 2026-12-01); no lr-transfer run with SOAP was made here either.

References:
  Yang et al. 2022, "Tensor Programs V", https://arxiv.org/abs/2203.03466
  Yang, Simon & Bernstein 2023, "A Spectral Condition for Feature Learning",
  https://arxiv.org/abs/2310.17813
"""
from collections.abc import Sequence
from typing import Any

import jax
from flax import linen as nn

from ravine.models.transformer import TransformerConfig

KINDS = ("embedding", "hidden", "readout", "vector")
# The optimizers whose hidden-matrix step grows with width (multiplier 1/r) and those whose
# step does not (multiplier 1), see the module docstring.
ADAM_LIKE = ("adam", "shampoo")
WIDTH_AWARE = ("muon", "soap")


def _keys(path):
    return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


def param_kind(path: Sequence[Any]) -> str:
    """The μP kind of the Transformer param at `path` (a tree path or a sequence of names):
    "embedding", "hidden", "readout" or "vector" (see the module table)."""
    keys = path if all(isinstance(k, str) for k in path) else _keys(path)
    if keys[0] in ("embed", "position"):
        return "embedding"
    if keys[0] == "head":
        return "readout"
    if keys[-1] == "kernel":
        return "hidden"
    return "vector"


def param_kinds(params: Any) -> Any:
    """The tree of `param_kind` strings for (boxed or unboxed) Transformer params."""
    return jax.tree.map_with_path(lambda path, _: param_kind(path), nn.unbox(params))


def mup_lr_multipliers(params: Any, config: TransformerConfig, optimizer: str = "adam") -> Any:
    """Per-leaf learning-rate multipliers of μP for `models.Transformer(config)`.

    Args:
      params: the model's params, boxed or unboxed (or their `jax.eval_shape`), without
        the outer {"params": ...}.
      config: its `TransformerConfig`.
      optimizer: "adam" (the Adam family: Adam, AdamW, Lion, Adafactor), "shampoo" (with
        grafting; as "adam"), "muon" or "soap" (no multipliers; see the module docstring).

    Returns:
      A pytree of Python floats with the (unboxed) params' structure: 1 / r =
      base_width / d_model for hidden matrices under "mup" with "adam" / "shampoo", 1.0 for every
      other leaf, and all 1.0 under "sp" (so the train job can always apply it).

    Raises:
      ValueError: for an unknown `optimizer`.
    """
    if optimizer not in ADAM_LIKE + WIDTH_AWARE:
        raise ValueError(f"optimizer must be one of {list(ADAM_LIKE + WIDTH_AWARE)}, "
                         f"got {optimizer!r}")
    hidden_lr = 1.0 / config.width_ratio if optimizer in ADAM_LIKE else 1.0
    return jax.tree.map(lambda kind: hidden_lr if kind == "hidden" else 1.0,
                        param_kinds(params))
