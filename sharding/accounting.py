r"""Memory and communication of distributed training, by formula (bytes, per device).

Three families, each a closed form from the paper that introduced it and each checked
against a compiled program on 8 emulated CPU devices (tests/test_accounting_hlo.py,
`bench_parallel --what=activations|remat|remat_every|comm|zero|offload`):

- Activations kept for the backward pass, per transformer layer, by recomputation policy
  (Korthikanti et al. 2022), and checkpointing every n blocks (Chen et al. 2016):
  `activation_bytes_per_layer`, `checkpointed_activation_bytes`, `optimal_checkpoint_every`.
- Params, gradients and optimizer state per device at ZeRO stage 0-3 (Rajbhandari et al.
  2020), in any precision: `zero_state_bytes`, `device_state_bytes` (what offload leaves).
- Bytes each device sends per step: data parallel and ZeRO (`zero_comm_bytes`), Megatron
  tensor parallelism (`tensor_parallel_comm_bytes`), pipeline point-to-point
  (`pipeline_comm_bytes`). They count what `sharding.hlo` reads from compiled programs:
  ring algorithms, (N - 1) / N of the buffer per reduce-scatter or all-gather.

Everything takes plain numbers (Psi = parameter count; s, b, h, a = sequence length,
micro-batch rows, d_model, heads), so it applies to any model; `models.count_params` gives
Psi of a ravine model. It lives in `sharding` because every formula here is about how a
step's bytes split over a mesh (ZeRO stages, N, t, S); `models.accounting` counts one
model's FLOPs on one device.

References:
  Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer
    Models", https://arxiv.org/abs/2205.05198 (Section 4, Table 2).
  Chen et al. 2016, "Training Deep Nets with Sublinear Memory Cost",
    https://arxiv.org/abs/1604.06174
  Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter
    Models", https://arxiv.org/abs/1910.02054 (Sections 3, 5 and 7).
  Shoeybi et al. 2019, "Megatron-LM", https://arxiv.org/abs/1909.08053 (Section 3).
  Huang et al. 2019, "GPipe", https://arxiv.org/abs/1811.06965
  Ren et al. 2021, "ZeRO-Offload", https://arxiv.org/abs/2101.06840
"""
import math
from collections.abc import Collection
from typing import NamedTuple

GB = 1e9   # the ZeRO paper's GB (its 7.5B example: 16 x 7.5e9 bytes = "120GB")

# Bytes per param of (params, gradients, optimizer state): the ZeRO paper's "2 + 2 + K".
PRECISIONS = {
    # fp16/bf16 params and gradients; fp32 master params, Adam's m and v: K = 12.
    "mixed": (2, 2, 12),
    # fp32 params and gradients, Adam's m and v (ravine's default policy, any compute dtype).
    "fp32": (4, 4, 8),
}

# Recomputation policies of `activation_bytes_per_layer` (ravine's `remat` values map onto
# them: "none" -> "none", "block" -> "full", "dots" -> "dots"; see `REMAT_POLICY`).
RECOMPUTE = ("none", "selective", "full", "dots")
REMAT_POLICY = {"none": "none", "block": "full", "dots": "dots"}

# Tree names of `device_state_bytes`'s offload argument (the train config's `offload`).
STATE_TREES = ("params", "gradients", "optimizer_state")


def _check(name, value, low=1):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= low:
        raise ValueError(f"{name} must be a number >= {low}, got {value!r}")


# --- activations -------------------------------------------------------------------------

def activation_bytes_per_layer(seq_len: int, batch: int, d_model: int, n_heads: int, *,
                               recompute: str = "none", d_ff: int | None = None,
                               gated: bool = False, value_bytes: float = 2,
                               softmax_bytes: float | None = None, dropout: bool = True,
                               tensor_parallel: int = 1,
                               sequence_parallel: bool = False) -> float:
    r"""Bytes one transformer layer keeps for its backward pass (Korthikanti et al. 2022).

    At the defaults (GPT: d_ff = 4h, GeLU, 2-byte activations, 1-byte dropout masks) this is
    the paper's Eq. (1), `s b h (34 + 5 a s / h)`; with `recompute="selective"` (the
    attention core recomputed) `34 s b h`; with "full" (only the layer's input kept)
    `2 s b h`. Item by item, in elements of v = `value_bytes` bytes (masks 1 byte):

        attention  norm input s b h, QKV input s b h, Q and K 2 s b h, V s b h,
                   softmax a s^2 b (softmax_bytes), its dropout mask a s^2 b and output
                   a s^2 b, output-projection input s b h, dropout mask s b h
        MLP        norm input s b h, first matmul's input s b h, activation input f s b h
                   (2 f s b h gated: up and gate), activation output f s b h, mask s b h

    with f = d_ff / h. Tensor parallelism over t devices splits everything between the
    column- and row-parallel matmuls (Q, K, V, softmax, the MLP's hidden activations) by t,
    Eq. (2): `s b h (10 + 24 / t + 5 a s / (h t))`; sequence parallelism splits the rest
    too, Eq. (4): `s b h / t (34 + 5 a s / h)`.

    "dots" is ravine's `remat="dots"` (jax's `dots_with_no_batch_dims_saveable`): the outputs
    of the weight matmuls are kept, Q, K, V, the attention output projection's, the MLP's
    first matmul(s) and its last, `(5 + f) s b h` values (`(5 + 2 f)` gated), and
    everything else is recomputed.

    Args:
      seq_len: s.
      batch: b, rows per micro-batch on this device (the data-parallel share).
      d_model: h.
      n_heads: a.
      recompute: one of `RECOMPUTE`.
      d_ff: the MLP's hidden width (default 4 h).
      gated: a gated MLP (SwiGLU and friends: up and gate both feed the activation).
      value_bytes: bytes of a stored activation (2 for bf16/fp16, 4 for fp32).
      softmax_bytes: bytes of a stored attention probability (default `value_bytes`).
      dropout: count dropout masks and the dropped-out attention probabilities (the
        paper's model has dropout; ravine's transformer has none).
      tensor_parallel: t.
      sequence_parallel: whether the norms and dropouts are split over t as well.

    Returns:
      Bytes per layer (a float: the paper's formula divides by t).

    Example:
      >>> s, b, h, a = 2048, 1, 12288, 96                      # GPT-3 175B, one sequence
      >>> activation_bytes_per_layer(s, b, h, a) == s * b * h * (34 + 5 * a * s / h)
      True
      >>> activation_bytes_per_layer(s, b, h, a, recompute="selective") == 34 * s * b * h
      True
      >>> activation_bytes_per_layer(s, b, h, a, tensor_parallel=8) == (
      ...     s * b * h * (10 + 24 / 8 + 5 * a * s / (h * 8)))
      True
    """
    for name, value in (("seq_len", seq_len), ("batch", batch), ("d_model", d_model),
                        ("n_heads", n_heads), ("tensor_parallel", tensor_parallel)):
        _check(name, value)
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute must be one of {list(RECOMPUTE)}, got {recompute!r}")
    t = tensor_parallel
    sbh = seq_len * batch * d_model
    f = (4 * d_model if d_ff is None else d_ff) / d_model
    v = value_bytes
    p = v if softmax_bytes is None else softmax_bytes
    mask = 1 if dropout else 0
    # what the norms and dropouts keep: replicated over t unless sequence parallel
    outside = 1 / t if sequence_parallel else 1
    if recompute == "full":
        return v * sbh * outside
    if recompute == "dots":
        return v * sbh * ((3 + (2 if gated else 1) * f) / t + 2 * outside)
    attention_core = seq_len * seq_len * batch * n_heads * (p + mask + (v if dropout else 0))
    per_t = v * sbh * (2 + 1 + 1 + (2 if gated else 1) * f + f)   # Q K, V, out in, MLP hidden
    replicated = sbh * (v * 4 + 2 * mask)   # 2 norm inputs, QKV and MLP inputs, 2 masks
    kept = per_t / t + replicated * outside
    if recompute == "none":
        kept += attention_core / t
    return kept


def checkpointed_activation_bytes(n_layers: int, layer_bytes: float, input_bytes: float,
                                  every: int = 1) -> float:
    """Peak stored activations with a checkpoint every `every` blocks (Chen et al. 2016).

    The input of every `every`-th block is kept (`ceil(L / every)` of them); in the backward
    pass one segment of `every` blocks is recomputed and holds its full activations:

        ceil(L / every) * input_bytes + every * layer_bytes

    which is smallest near `every = sqrt(L * input_bytes / layer_bytes)` (Chen et al.'s
    sqrt(n) schedule when a layer's activations and its input are similar in size). Each
    block is recomputed once whatever `every` is: one extra forward pass of the blocks.

    Args:
      n_layers: L.
      layer_bytes: a layer's activations without recomputation
        (`activation_bytes_per_layer(..., recompute="none")`).
      input_bytes: one layer's input (`... recompute="full"`).
      every: blocks per checkpointed segment, 1 <= every <= L.

    Example:
      >>> [checkpointed_activation_bytes(16, 17.0, 1.0, n) for n in (1, 4, 16)]
      [33.0, 72.0, 273.0]
    """
    _check("n_layers", n_layers)
    _check("every", every)
    if every > n_layers:
        raise ValueError(f"every must be <= n_layers ({n_layers}), got {every}")
    return math.ceil(n_layers / every) * input_bytes + every * layer_bytes


def optimal_checkpoint_every(n_layers: int, layer_bytes: float, input_bytes: float) -> float:
    """The segment length that minimises `checkpointed_activation_bytes` (Chen et al. 2016).

    For `every` dividing L the stored bytes are `L / every * input_bytes + every *
    layer_bytes`, convex in `every`, smallest at

        every* = sqrt(L * input_bytes / layer_bytes)

    (clipped to [1, L]); among the divisors of L the best is one of the two around it. When a
    layer keeps no more than its input (`layer_bytes == input_bytes`, the unit-cost chain of
    Chen et al., "Training Deep Nets with Sublinear Memory Cost",
    https://arxiv.org/abs/1604.06174) this is their sqrt(L) schedule: sqrt(L)
    segments of sqrt(L) layers, 2 sqrt(L) stored. A transformer layer keeps much more than
    its input (`activation_bytes_per_layer`: 34 s b h + 5 a s^2 b against 2 s b h at 2-byte
    values, >= 17x), so its optimum is sqrt(L / 17) or less, and checkpointing every block
    (`every = 1`) stores the least up to L = 2 layer_bytes / input_bytes (34 layers at 17x).

    Args:
      n_layers: L.
      layer_bytes: a layer's activations without recomputation.
      input_bytes: one layer's input.

    Example:
      >>> optimal_checkpoint_every(16, 1.0, 1.0)              # Chen et al.'s sqrt(L)
      4.0
      >>> optimal_checkpoint_every(16, 32.0, 1.0)             # a layer 32x its input
      1.0
    """
    _check("n_layers", n_layers)
    if not layer_bytes > 0 or not input_bytes > 0:
        raise ValueError(f"layer_bytes and input_bytes must be > 0, got {layer_bytes!r} and "
                         f"{input_bytes!r}")
    return min(float(n_layers), max(1.0, math.sqrt(n_layers * input_bytes / layer_bytes)))


# --- params, gradients, optimizer state ----------------------------------------------------

class StateBytes(NamedTuple):
    """Bytes of one device's params, gradients and optimizer state."""
    params: float
    gradients: float
    optimizer_state: float

    @property
    def total(self) -> float:
        return self.params + self.gradients + self.optimizer_state


def _precision(precision):
    if isinstance(precision, str):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)} or a "
                             f"(param, gradient, optimizer) bytes triple, got {precision!r}")
        return PRECISIONS[precision]
    if len(precision) != 3:
        raise ValueError(f"precision must be a (param, gradient, optimizer) bytes triple, "
                         f"got {precision!r}")
    return tuple(precision)


def zero_state_bytes(num_params: float, zero: int, data_parallel: int,
                     precision: str | tuple[float, float, float] = "mixed") -> StateBytes:
    r"""Per-device bytes of params, gradients and optimizer state at ZeRO stage `zero`.

    Rajbhandari et al. 2020, Figure 1: with 2 + 2 + K bytes per param (mixed-precision
    Adam: K = 12 for the fp32 master params, momentum and variance) and N = data-parallel
    degree, stage 1 splits the optimizer state N ways, stage 2 also the gradients,
    stage 3 also the params:

        zero 0: (2 + 2 + K) Psi        zero 1: 2 Psi + 2 Psi + K Psi / N
        zero 2: 2 Psi + (2 + K) Psi / N                 zero 3: (2 + 2 + K) Psi / N

    Args:
      num_params: Psi.
      zero: 0, 1, 2 or 3.
      data_parallel: N, the devices the state is split over.
      precision: "mixed" (2, 2, 12), "fp32" (4, 4, 8) or a (param, gradient, optimizer)
        bytes-per-param triple.

    Returns:
      `StateBytes(params, gradients, optimizer_state)`; `.total` sums them.

    Example (the paper's 7.5B model on 64 GPUs, in GB):
      >>> [round(zero_state_bytes(7.5e9, z, 64).total / GB, 1) for z in range(4)]
      [120.0, 31.4, 16.6, 1.9]
    """
    _check("num_params", num_params, 0)
    _check("data_parallel", data_parallel)
    if isinstance(zero, bool) or zero not in (0, 1, 2, 3):
        raise ValueError(f"zero must be one of (0, 1, 2, 3), got {zero!r}")
    param, grad, optimizer = _precision(precision)
    n = data_parallel
    return StateBytes(params=param * num_params / (n if zero >= 3 else 1),
                      gradients=grad * num_params / (n if zero >= 2 else 1),
                      optimizer_state=optimizer * num_params / (n if zero >= 1 else 1))


def device_state_bytes(state: StateBytes, offload: Collection[str] = ()) -> float:
    """The part of `state` left in device memory when the trees in `offload` live on the host.

    Args:
      state: from `zero_state_bytes`.
      offload: names from `STATE_TREES` ("params", "gradients", "optimizer_state"), as
        ZeRO-Offload (optimizer state and gradients) and ZeRO-Infinity (also params) move.

    Example:
      >>> s = zero_state_bytes(7.5e9, 0, 1)
      >>> device_state_bytes(s, ("optimizer_state",)) / GB, device_state_bytes(s) / GB
      (30.0, 120.0)
    """
    unknown = set(offload) - set(STATE_TREES)
    if unknown:
        raise ValueError(f"offload names must be among {list(STATE_TREES)}, got "
                         f"{sorted(unknown)}")
    return sum(getattr(state, name) for name in STATE_TREES if name not in offload)


# --- communication -------------------------------------------------------------------------

def ring_factor(n: int) -> float:
    """(N - 1) / N: the share of a buffer each of N devices sends in a ring reduce-scatter or
    all-gather (an all-reduce is both: twice that)."""
    _check("n", n)
    return (n - 1) / n


def zero_comm_bytes(num_params: float, zero: int, data_parallel: int,
                    value_bytes: float = 2) -> float:
    r"""Bytes each device sends per step for gradients and params at ZeRO stage `zero`.

    Rajbhandari et al. 2020, Section 7: plain data parallelism all-reduces the gradients,
    `2 Psi` (a reduce-scatter and an all-gather of Psi each); ZeRO-1 and -2 reduce-scatter
    the gradients and all-gather the updated params, the same `2 Psi`; ZeRO-3 all-gathers
    the params for the forward pass and again for the backward pass and reduce-scatters
    the gradients, `3 Psi`, 1.5x. Here with the ring's exact (N - 1) / N:

        zero 0-2: 2 (N - 1) / N Psi v        zero 3: 3 (N - 1) / N Psi v

    Args:
      num_params: Psi.
      zero: 0, 1, 2 or 3.
      data_parallel: N.
      value_bytes: v, bytes per communicated gradient / param (2 in the paper's fp16).

    Example:
      >>> zero_comm_bytes(1e9, 3, 64) / zero_comm_bytes(1e9, 0, 64)
      1.5
    """
    _check("num_params", num_params, 0)
    if isinstance(zero, bool) or zero not in (0, 1, 2, 3):
        raise ValueError(f"zero must be one of (0, 1, 2, 3), got {zero!r}")
    passes = 3 if zero == 3 else 2
    return passes * ring_factor(data_parallel) * num_params * value_bytes


def tensor_parallel_comm_bytes(seq_len: int, batch: int, d_model: int, tensor_parallel: int,
                               n_layers: int = 1, value_bytes: float = 2) -> float:
    r"""Bytes each device sends per step for Megatron tensor parallelism's all-reduces.

    Shoeybi et al. 2019, Section 3 / Figure 4: per layer, the attention block and the MLP
    each all-reduce their [s, b, h] output in the forward pass (operator g) and the
    gradient of their input in the backward pass (operator f): 4 all-reduces of s b h
    values per layer and step, each `2 (t - 1) / t` of the buffer per device in a ring.
    (Sequence parallelism replaces each by a reduce-scatter and an all-gather: the same
    bytes.) The embedding and the LM head add their own; not counted here.

        4 L * 2 (t - 1) / t * s b h v

    Args:
      seq_len: s.
      batch: b, the rows of this data-parallel replica.
      d_model: h.
      tensor_parallel: t.
      n_layers: L.
      value_bytes: v.

    Example:
      >>> tensor_parallel_comm_bytes(1024, 8, 4096, 8, n_layers=1) / 2**20   # MiB
      448.0
    """
    for name, value in (("seq_len", seq_len), ("batch", batch), ("d_model", d_model),
                        ("n_layers", n_layers)):
        _check(name, value)
    return 4 * n_layers * 2 * ring_factor(tensor_parallel) * seq_len * batch * d_model * \
        value_bytes


def pipeline_comm_bytes(seq_len: int, batch: int, d_model: int, value_bytes: float = 2) -> float:
    r"""Bytes each pipeline stage sends per step, point to point (GPipe, Huang et al. 2019).

    Every micro-batch's activations [s, b / M, h] go to the next stage once in the forward
    pass and their gradients to the previous stage once in the backward pass, so the M
    micro-batches together send `2 s b h v` per stage, whatever M and S are. (A schedule
    that also passes buffers in its bubble ticks sends (M + S - 1) / M times that.)

    Args:
      seq_len: s.
      batch: b, all rows of the step on this data-parallel replica.
      d_model: h.
      value_bytes: v.

    Example:
      >>> pipeline_comm_bytes(1024, 8, 4096) / 2**20   # MiB
      128.0
    """
    for name, value in (("seq_len", seq_len), ("batch", batch), ("d_model", d_model)):
        _check(name, value)
    return 2 * seq_len * batch * d_model * value_bytes
