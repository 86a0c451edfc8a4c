"""ravine.models: Flax (linen) models with a mixed-precision dtype policy.

Params carry logical axis names ("vocab", "embed", "mlp", "heads", "kv", "length") and
activations are constrained to ("batch", "length", "embed"), so `sharding.RULES` lays a model
out on any mesh without changes here.

    cfg = models.TransformerConfig(d_model=512, policy="p=f32,c=bf16,o=f32")
    model = models.Transformer(cfg)
    variables = model.init(key, tokens)                      # {"params": boxed params}
    loss = models.cross_entropy(model.apply(variables, tokens[:, :-1]), tokens[:, 1:])

μP (tune the lr at base_width, train wider with the same lr), QK-norm and z-loss:

    cfg = models.TransformerConfig(d_model=1024, parametrization="mup", base_width=256,
                                   qk_norm=True)
    params = nn.unbox(models.Transformer(cfg).init(key, tokens))["params"]
    tx = optax.chain(optim.adamw(lr), optim.scale_by_multipliers(
        models.mup_lr_multipliers(params, cfg)))
    loss, metrics = models.lm_loss(logits, targets, z_loss=1e-4)  # metrics["z_loss"]
"""
from ravine.models.accounting import count_params, flops_per_token, non_embedding_params
from ravine.models.attention import causal_attention, chunked_causal_attention
from ravine.models.loss import cross_entropy, lm_loss
from ravine.models.mlp import MLP
from ravine.models.mup import mup_lr_multipliers, param_kind, param_kinds
from ravine.models.policy import FP8_COLLECTION, Policy, get_policy
from ravine.models.transformer import (Block, CausalSelfAttention, FeedForward, Transformer,
                                TransformerConfig, max_attention_logit, rotary_embedding)

__all__ = [
    "MLP", "Block", "CausalSelfAttention", "FeedForward", "Policy", "Transformer",
    "TransformerConfig", "causal_attention", "chunked_causal_attention", "count_params",
    "cross_entropy", "flops_per_token", "get_policy", "non_embedding_params",
    "rotary_embedding",
    # μP, QK-norm and z-loss (mup.py, transformer.py, loss.py)
    "lm_loss", "max_attention_logit", "mup_lr_multipliers", "param_kind", "param_kinds",
    # float8 matmuls' scales (policy.py, `Policy.matmul == "fp8"`)
    "FP8_COLLECTION",
]
