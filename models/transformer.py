"""A causal decoder-only transformer language model (GPT-2 / LLaMA family), in Flax linen.

    tokens [B, T] -> embed -> n_layers x Block -> final norm -> logits [B, T, vocab]
    Block: x + Attention(norm(x)), then x + FeedForward(norm(x))   (pre-norm)

Choices (defaults are LLaMA-like; GPT-2 is `mlp="gelu", norm="layernorm",
position="learned", tie_embeddings=True`):
- Positions: rotary embeddings on queries and keys (`position="rope"`, Su et al., 2021,
  "RoFormer"; the rotate-half convention of GPT-NeoX / LLaMA) or a learned absolute table
  added to the token embeddings (`position="learned"`, GPT-2).
- No biases in linear layers. Init as GPT-2 / nanoGPT: N(0, init_std) for every matrix, and
  init_std / sqrt(2 * n_layers) for the two projections that write into the residual stream
  (attention output, second MLP layer), so the residual's variance does not grow with depth.
- Parametrization: "sp" (the above) or "mup" (Yang et al. 2022, Tensor Programs V), the
  μP of Adam-family optimizers relative to a base width; see `TransformerConfig` and
  `models.mup_lr_multipliers`. Optional QK-norm (`qk_norm`, Dehghani et al. 2023; Wortsman
  et al. 2023).
- Mixed precision by `policy`: params stored in param dtype (fp32 master weights), matmuls
  in compute dtype, attention softmax and norms in float32, logits returned in output dtype.
  A policy with `matmul=fp8` runs the attention and MLP projections in float8 (the head and
  the attention scores stay in the compute dtype); its variables then hold the collection
  `models.FP8_COLLECTION` beside "params".
- Every param is boxed with logical axis names ("vocab", "embed", "mlp", "heads", "kv",
  "length") and activations are constrained to ("batch", "length", "embed"); the sharding
  rules map those onto a mesh without touching the model.
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import linen as nn

from ravine.models.attention import IMPLEMENTATIONS, causal_attention
from ravine.models.layers import Dense, logical_init
from ravine.models.policy import get_policy

# Shazeer 2020's feed-forward variants: act(x W1) W2, or gated (act(x W) * x V) W2.
ACTIVATIONS = {
    "relu": nn.relu,
    "gelu": nn.gelu,  # flax's default: the tanh approximation (as GPT-2)
    "swish": nn.silu,  # Swish_1 = x * sigmoid(x)
    "glu": nn.sigmoid,
    "bilinear": None,  # no activation: (x W) * (x V)
    "geglu": nn.gelu,
    "swiglu": nn.silu,
    "reglu": nn.relu,
}
GATED_MLPS = ("glu", "bilinear", "geglu", "swiglu", "reglu")
MLPS = tuple(ACTIVATIONS)
NORMS = ("rmsnorm", "layernorm")
REMATS = ("none", "block", "dots")
POSITIONS = ("rope", "learned")
PARAMETRIZATIONS = ("sp", "mup")

# What a rematerialised block keeps for the backward pass; everything else is recomputed.
# "dots" keeps the outputs of the weight matmuls (dot_generals without batch dimensions), but
# not the attention scores (they have batch dims), so it never stores a length^2 tensor.
REMAT_POLICIES = {
    "block": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def _check_positive_int(name, value):
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _check_one_of(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
    """Hyperparameters of `Transformer` (hashable; validated at construction).

    Attributes:
      vocab_size: number of token ids.
      d_model: width of the residual stream.
      n_layers: number of blocks.
      n_heads: attention heads; must divide d_model.
      d_ff: hidden width of the MLP; None gives 4 * d_model for the non-gated variants and,
        for the gated ones (three matrices instead of two), 2/3 of that, 8/3 * d_model,
        rounded up to a multiple of 64 (as LLaMA): the same parameter count, exactly when
        d_model is a multiple of 24 (Shazeer's d_model=768: d_ff 3072 and 2048).
      max_len: the longest sequence the model accepts (size of the learned position table).
      mlp: the feed-forward variant (Shazeer 2020, "GLU Variants Improve Transformer",
        https://arxiv.org/abs/2002.05202): non-gated `act(x W1) W2` with act "relu",
        "gelu" (tanh approximation) or "swish" (x sigmoid(x)); gated
        `(act(x W) * (x V)) W2` with "glu" (sigmoid), "bilinear" (no activation), "geglu",
        "swiglu" or "reglu". W, V, W2 are the params "gate", "up", "down".
      norm: "rmsnorm" (Zhang & Sennrich, 2019) or "layernorm".
      remat: "none", "block" (recompute each block in the backward pass, save nothing) or
        "dots" (save the weight-matmul outputs, recompute the rest).
      remat_every: with remat "block", checkpoint segments of this many consecutive blocks
        (Chen et al. 2016, https://arxiv.org/abs/1604.06174): only each segment's input is
        kept and the backward pass recomputes the segment's blocks at once, so memory is
        ceil(L / n) inputs + n blocks' activations (`sharding.accounting.
        checkpointed_activation_bytes`); 1 (default) checkpoints every block. The params are
        the same at any value; the pipelined blocks (`models.pipeline`) checkpoint each one.
      attention: "xla", "cudnn" or "chunked" (see `models.attention`).
      policy: a dtype policy spec (see `models.get_policy`).
      position: "rope" or "learned".
      tie_embeddings: use the token embedding as the output head (logits = x E^T).
      rope_base: the rotary base wavelength.
      init_std: standard deviation of the weight init.
      attention_chunk_size: keys per block for attention="chunked".
      parametrization: "sp" (standard) or "mup" (maximal update parametrization, Yang et
        al. 2022, https://arxiv.org/abs/2203.03466, its Adam table). With
        r = d_model / base_width, "mup" changes three things, all identities at r = 1:
        the hidden matrices (attention q/k/v/out, MLP up/gate/down) are initialised with
        std `init_std / sqrt(r)` (variance ∝ 1/fan_in; the residual projections keep
        their extra 1/sqrt(2 n_layers)); the readout's input is multiplied by 1/r (the
        mup package's MuReadout; also with tied embeddings); attention logits are
        `q.k * sqrt(d_head_base) / d_head` with d_head_base = base_width / n_heads
        (n_heads stays fixed as the width grows). Embeddings, norms and the readout
        matrix keep a width-independent init. The hidden matrices' learning rate must be
        multiplied by 1/r: `models.mup_lr_multipliers` gives the factors, applied with
        `optim.scale_by_multipliers`. Width here means d_model and the MLP width
        together: keep d_ff proportional to d_model (d_ff=None or 4 * d_model).
      base_width: the d_model at which "mup" equals "sp" (the width tuned on); None means
        d_model (r = 1). Ignored by "sp".
      qk_norm: normalise queries and keys per head over head_dim (the `norm` type, with a
        learned scale per head dim), before the rotary embedding: bounds the attention
        logits (Dehghani et al. 2023, https://arxiv.org/abs/2302.05442; Wortsman et al.
        2023, https://arxiv.org/abs/2309.14322).
    """
    vocab_size: int = 256
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int | None = None
    max_len: int = 256
    mlp: str = "swiglu"
    norm: str = "rmsnorm"
    remat: str = "none"
    attention: str = "xla"
    policy: str = "params=float32,compute=float32,output=float32"
    position: str = "rope"
    tie_embeddings: bool = False
    rope_base: float = 10000.0
    init_std: float = 0.02
    attention_chunk_size: int = 128
    parametrization: str = "sp"
    base_width: int | None = None
    qk_norm: bool = False
    remat_every: int = 1

    def __post_init__(self):
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_len",
                     "attention_chunk_size"):
            _check_positive_int(name, getattr(self, name))
        if self.d_ff is not None:
            _check_positive_int("d_ff", self.d_ff)
        _check_positive_int("remat_every", self.remat_every)
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must divide d_model ({self.d_model})")
        if self.position == "rope" and self.head_dim % 2:
            raise ValueError(f"position='rope' needs an even head dim, got "
                             f"d_model / n_heads = {self.head_dim}")
        _check_one_of("mlp", self.mlp, MLPS)
        _check_one_of("norm", self.norm, NORMS)
        _check_one_of("remat", self.remat, REMATS)
        _check_one_of("attention", self.attention, IMPLEMENTATIONS)
        _check_one_of("position", self.position, POSITIONS)
        _check_one_of("parametrization", self.parametrization, PARAMETRIZATIONS)
        if self.base_width is not None:
            _check_positive_int("base_width", self.base_width)
        if not isinstance(self.qk_norm, bool):
            raise ValueError(f"qk_norm must be True or False, got {self.qk_norm!r}")
        for name in ("rope_base", "init_std"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        get_policy(self.policy)  # raises ValueError on a bad spec

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def width_ratio(self) -> float:
        """r = d_model / base_width under "mup"; 1.0 under "sp" or without a base width."""
        if self.parametrization == "sp" or self.base_width is None:
            return 1.0
        return self.d_model / self.base_width

    @property
    def attention_scale(self) -> float:
        """The factor on q.k: 1/sqrt(d_head) ("sp"), sqrt(d_head_base)/d_head ("mup")."""
        return 1.0 / (math.sqrt(self.head_dim) * math.sqrt(self.width_ratio))

    @property
    def ff_dim(self) -> int:
        """The MLP hidden width, `d_ff` or its default."""
        if self.d_ff is not None:
            return self.d_ff
        if self.mlp not in GATED_MLPS:
            return 4 * self.d_model
        return 64 * -(-8 * self.d_model // (3 * 64))  # ceil(8/3 d / 64) * 64


def _norm(config, name, axis_name="embed"):
    """RMSNorm / LayerNorm over the last axis (logical name `axis_name`); flax computes the
    statistics and the scaling in float32."""
    policy = get_policy(config.policy)
    kwargs = dict(dtype=policy.compute_dtype, param_dtype=policy.param_dtype, name=name,
                  scale_init=logical_init(nn.initializers.ones_init(), (axis_name,)))
    if config.norm == "rmsnorm":
        return nn.RMSNorm(**kwargs)
    return nn.LayerNorm(bias_init=logical_init(nn.initializers.zeros_init(), (axis_name,)),
                        **kwargs)


def _hidden_init(config, std):
    """N(0, std) for a hidden matrix; under "mup" std / sqrt(r), so variance ∝ 1/fan_in."""
    return nn.initializers.normal(std / math.sqrt(config.width_ratio))


def _residual_init(config):
    """GPT-2's init for projections into the residual stream: std / sqrt(2 * n_layers)."""
    return _hidden_init(config, config.init_std / math.sqrt(2 * config.n_layers))


def rotary_embedding(x: jax.Array, base: float = 10000.0) -> jax.Array:
    """Rotates pairs (x_i, x_{i + d/2}) of `x` [B, T, H, d] by angle t * base^(-2i/d).

    Computed in float32 and returned in x's dtype. After it, q . k depends on positions only
    through their difference (Su et al., 2021).
    """
    length, dim = x.shape[1], x.shape[-1]
    inv_freq = base ** (-jnp.arange(0, dim, 2, dtype=jnp.float32) / dim)
    angles = jnp.arange(length, dtype=jnp.float32)[:, None] * inv_freq[None, :]  # [T, d/2]
    cos = jnp.cos(angles)[None, :, None, :]
    sin = jnp.sin(angles)[None, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


def max_attention_logit(q: jax.Array, k: jax.Array, scale: float) -> jax.Array:
    """The largest `scale * q.k` over heads and causal (query >= key) pairs, in float32."""
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    causal = jnp.tril(jnp.ones((q.shape[1], k.shape[1]), bool))
    return jnp.max(jnp.where(causal, scores, -jnp.inf))


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention; Q, K, V column-parallel over heads, output row-parallel.

    When `apply` is called with `mutable=["attention_stats"]`, it records the largest
    attention logit of the call as `max_logit` (the quantity that grows without QK-norm,
    Wortsman et al. 2023); otherwise (and in `init`) that is not computed.
    """
    config: TransformerConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        policy = get_policy(cfg.policy)
        init = _hidden_init(cfg, cfg.init_std)
        heads = (cfg.n_heads, cfg.head_dim)
        q, k, v = (Dense(heads, ("embed", "heads", "kv"), policy, init, name=name)(x)
                   for name in ("query", "key", "value"))
        if cfg.qk_norm:
            q = _norm(cfg, "query_norm", "kv")(q)
            k = _norm(cfg, "key_norm", "kv")(k)
        if cfg.position == "rope":
            q, k = rotary_embedding(q, cfg.rope_base), rotary_embedding(k, cfg.rope_base)
        if cfg.width_ratio != 1.0:
            # The kernels divide by sqrt(d_head); this makes the logits' factor μP's
            # sqrt(d_head_base) / d_head (sqrt(d_head) * attention_scale = 1 / sqrt(r)).
            q = q * jnp.asarray(1.0 / math.sqrt(cfg.width_ratio), q.dtype)
        if self.is_mutable_collection("attention_stats") and not self.is_initializing():
            self.sow("attention_stats", "max_logit",
                     max_attention_logit(q, k, 1.0 / math.sqrt(cfg.head_dim)))
        names = ("batch", "length", "heads", "kv")
        q, k, v = (nn.with_logical_constraint(t, names) for t in (q, k, v))
        y = causal_attention(q, k, v, cfg.attention, cfg.attention_chunk_size)
        y = nn.with_logical_constraint(y, names)
        return Dense((cfg.d_model,), ("heads", "kv", "embed"), policy, _residual_init(cfg),
                     contract=2, name="out")(y)


class FeedForward(nn.Module):
    """Gated `down(act(gate(x)) * up(x))` (e.g. SwiGLU) or `down(act(up(x)))` (e.g. GELU).

    `act` is `ACTIVATIONS[config.mlp]` (identity for "bilinear"); Shazeer 2020,
    https://arxiv.org/abs/2002.05202, Section 2 (without biases, as the paper's FFNs).
    """
    config: TransformerConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.config
        policy = get_policy(cfg.policy)
        init = _hidden_init(cfg, cfg.init_std)
        activation = ACTIVATIONS[cfg.mlp]
        hidden = Dense((cfg.ff_dim,), ("embed", "mlp"), policy, init, name="up")(x)
        if cfg.mlp in GATED_MLPS:
            gate = Dense((cfg.ff_dim,), ("embed", "mlp"), policy, init, name="gate")(x)
            hidden = (gate if activation is None else activation(gate)) * hidden
        else:
            hidden = activation(hidden)
        hidden = nn.with_logical_constraint(hidden, ("batch", "length", "mlp"))
        return Dense((cfg.d_model,), ("mlp", "embed"), policy, _residual_init(cfg),
                     name="down")(hidden)


class Block(nn.Module):
    """Pre-norm transformer block: `x += attn(norm(x)); x += mlp(norm(x))`."""
    config: TransformerConfig

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + CausalSelfAttention(self.config, name="attn")(_norm(self.config, "attn_norm")(x))
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        x = x + FeedForward(self.config, name="mlp")(_norm(self.config, "mlp_norm")(x))
        return nn.with_logical_constraint(x, ("batch", "length", "embed"))


def _run_blocks(module, cfg, x):
    """`block_0 ... block_{L-1}` of `module` on x, rematerialised in segments of
    `cfg.remat_every` blocks (a function-level `nn.remat`: the blocks keep their names)."""
    def segment(module, x, start, stop):
        for i in range(start, stop):
            x = Block(cfg, name=f"block_{i}", parent=module)(x)
        return x

    if cfg.remat != "none":
        segment = nn.remat(segment, policy=REMAT_POLICIES[cfg.remat], static_argnums=(2, 3))
    for start in range(0, cfg.n_layers, cfg.remat_every):
        x = segment(module, x, start, min(start + cfg.remat_every, cfg.n_layers))
    return x


class Transformer(nn.Module):
    """Causal decoder-only LM: `apply(variables, tokens[B, T]) -> logits[B, T, vocab]`.

    `variables` is `{"params": ...}`, boxed (as `init` returns them) or unboxed. Logits at
    position t depend only on tokens[:, :t + 1]. T may not exceed `config.max_len`.
    """
    config: TransformerConfig

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        cfg = self.config
        policy = get_policy(cfg.policy)
        length = tokens.shape[1]
        if length > cfg.max_len:
            raise ValueError(f"sequence length {length} exceeds max_len {cfg.max_len}")
        embed = nn.Embed(cfg.vocab_size, cfg.d_model, dtype=policy.compute_dtype,
                         param_dtype=policy.param_dtype, name="embed",
                         embedding_init=logical_init(nn.initializers.normal(cfg.init_std),
                                                     ("vocab", "embed")))
        x = embed(tokens)
        if cfg.position == "learned":
            table = self.param("position", logical_init(nn.initializers.normal(cfg.init_std),
                                                        ("length", "embed")),
                               (cfg.max_len, cfg.d_model), policy.param_dtype)
            x = x + policy.cast_to_compute(table[:length])
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))

        x = _run_blocks(self, cfg, x)

        x = _norm(cfg, "final_norm")(x)
        if cfg.width_ratio != 1.0:
            # μP's readout multiplier base_width / d_model (MuReadout); on the readout's
            # input, which is the same product and d_model / vocab times cheaper.
            x = x * jnp.asarray(1.0 / cfg.width_ratio, x.dtype)
        if cfg.tie_embeddings:
            logits = embed.attend(x)
        else:
            # The readout stays out of float8 (as torchao's float8 example leaves the last
            # layer): it sets the logits' precision directly, and in an LLM it is a small share
            # of the FLOPs.
            head_policy = dataclasses.replace(policy, matmul="compute")
            logits = Dense((cfg.vocab_size,), ("embed", "vocab"), head_policy,
                           nn.initializers.normal(cfg.init_std), name="head")(x)
        logits = nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
        return policy.cast_to_output(logits)
