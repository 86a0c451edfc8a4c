"""Byte-level transformer language model on a text corpus (default: Python's stdlib source).

Variants (`--config=experiments/configs/lm.py:<variant>`; tokens are bytes, vocab 256):
  tiny   0.14M params: 2 layers x 64 wide, 64-byte context, 1K tokens per step; a CPU smoke
         test (a minute or two):
         python -m ravine.experiments.train --config=experiments/configs/lm.py:tiny --workdir=runs/tiny
  small  3.3M params: 4 layers x 256 wide, 256-byte context, 8K tokens per step (the default
         variant); a few minutes on a GPU:
         python -m ravine.experiments.train --config=experiments/configs/lm.py:small \
             --config.optimizer.name=lion --config.optimizer.learning_rate=1e-4 --workdir=runs/small
  124m   GPT-2 small's shape (12 layers x 768, GELU, LayerNorm, learned positions, tied
         embeddings; 86M params with a byte vocabulary), 1024-byte context, bf16 compute,
         0.5M tokens per step (64 rows x 8 accumulated micro-batches), nanoGPT's AdamW:
         python -m ravine.experiments.train --config=experiments/configs/lm.py:124m \
             --config.mesh=data=-1 --config.zero=1 --workdir=runs/124m

Every hyperparameter of every optimizer in `optim.available()` is a field of `optimizer`
(None = that optimizer's default), so e.g. `--config.optimizer.name=shampoo
--config.optimizer.block_size=512` works; setting one the chosen optimizer does not take
exits with status 2 (`=None` unsets a field a variant set). `schedule` works the same way
for the schedules in `SCHEDULES`; its `peak_value` (or `value`) defaults to
`optimizer.learning_rate` and `total_steps` to `steps`. E.g. a constant learning rate on
a variant with warmup: `--config.schedule.name=constant --config.schedule.warmup_steps=None`.
"""
import dataclasses
import inspect

import ml_collections
from ml_collections import config_dict

from ravine import models
from ravine import optim
# The runtime registers the optimizers that bring their own step (K-FAC) with optim.
from ravine.experiments.runtime.builders import SCHEDULES
from ravine.optim import schedules

# Optimizer arguments filled by the runtime from other fields: learning_rate (with the
# schedule), mask (from no_decay) and muon_mask (from muon_exclude).
DERIVED_HPARAMS = ("learning_rate", "mask", "muon_mask")
# Schedule arguments defaulting to optimizer.learning_rate and steps.
DERIVED_SCHEDULE_ARGS = ("value", "peak_value", "total_steps")


def hparam_fields(functions, derived=()):
    """A None field for each keyword argument of any of `functions`, except `derived`.

    Fields left None are not passed, so each function keeps its own default. The fields
    take any python literal from the command line (`=0.9`, `=true`, `=adam`, `=None`):
    the functions validate their own arguments.
    """
    names = {arg for function in functions
             for arg in inspect.signature(function).parameters if arg not in derived}
    return {name: config_dict.placeholder(object) for name in sorted(names)}


def _optimizers():
    """Every registered optimizer's factory (Optax transforms and those with their own step,
    K-FAC): each keyword argument of any of them is a field of `config.optimizer`."""
    return [spec.factory for spec in optim.specs()]


def _model_fields():
    """TransformerConfig's fields and defaults, less those the LM fixes or derives:
    vocab_size (256 bytes), policy (from `precision`) and max_len (follows seq_len)."""
    fixed = ("vocab_size", "policy", "max_len")
    return {f.name: (config_dict.placeholder(int) if f.default is None else f.default)
            for f in dataclasses.fields(models.TransformerConfig) if f.name not in fixed}


VARIANTS = {
    "tiny": dict(
        steps=300, batch_size=16, seq_len=64, log_every=10, eval_every=100,
        checkpoint_every=100, eval_batches=4,
        model=dict(d_model=64, n_layers=2, n_heads=2),
        optimizer=dict(learning_rate=3e-3), schedule=dict(warmup_steps=30)),
    "small": dict(
        steps=3000, batch_size=32, seq_len=256, log_every=20, eval_every=250,
        checkpoint_every=500, eval_batches=16,
        model=dict(d_model=256, n_layers=4, n_heads=4),
        optimizer=dict(learning_rate=1e-3), schedule=dict(warmup_steps=200)),
    "124m": dict(
        steps=5000, batch_size=64, grad_accum=8, seq_len=1024, log_every=10, eval_every=250,
        checkpoint_every=500, eval_batches=32, precision="params=float32,compute=bfloat16,"
        "output=float32",
        model=dict(d_model=768, n_layers=12, n_heads=12, mlp="gelu", norm="layernorm",
                   position="learned", tie_embeddings=True),
        optimizer=dict(learning_rate=6e-4, b2=0.95, weight_decay=0.1),  # nanoGPT's AdamW
        schedule=dict(warmup_steps=500)),
}


def get_config(variant="small"):
    """The LM config; `variant` is one of VARIANTS (see the module docstring)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown lm variant {variant!r}; known: {', '.join(VARIANTS)}")
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.steps = 1000
    config.batch_size = 32              # global rows per micro-batch (all processes)
    config.grad_accum = 1               # micro-batches per optimizer step
    config.seq_len = 256
    config.log_every = 10
    config.eval_every = 250
    config.eval_batches = 8             # held-out batches (of batch_size rows) per eval
    config.checkpoint_every = 500
    config.keep_checkpoints = 3
    config.mesh = "data=-1"             # sharding.make_mesh spec
    config.zero = 0                     # ZeRO over "data": 1 state, 2 + grads, 3 + params
    config.microbatches = 1             # pipeline micro-batches per row batch (mesh stage > 1)
    config.offload_optimizer_state = False  # keep optimizer state in host memory
    config.offload = ""                 # host-memory trees: "params", "optimizer_state"
    config.precision = "params=float32,compute=float32,output=float32"  # models.get_policy
    config.loss_scale = "auto"          # auto (dynamic iff float16 anywhere) | none | dynamic
    config.corpus = ""                  # file or folder; "" = the Python stdlib's source
    config.valid_fraction = 0.05        # share of documents held out for eval
    config.peak_flops = 0.0             # per device, for MFU; 0 = look up the device kind

    config.model = ml_collections.ConfigDict(_model_fields())
    # Follows seq_len until set; setting it leaves seq_len alone (must be >= seq_len).
    config.model.max_len = config.get_ref("seq_len") * 1

    config.optimizer = ml_collections.ConfigDict(hparam_fields(_optimizers(), DERIVED_HPARAMS))
    config.optimizer.name = "adamw"
    config.optimizer.learning_rate = 1e-3
    # Path keys of leaves that get no weight decay (passed as `mask` to optimizers taking
    # one): biases and norm gains (as nanoGPT) and the embedding / position tables (as many
    # LLaMA-style recipes; nanoGPT decays those). "" decays every leaf.
    config.optimizer.no_decay = "bias,scale,embed,position"
    # Muon only: path keys of leaves routed to AdamW instead (`optim.hidden_matrices`: the
    # other 2-D kernels and the 3-D attention kernels go to Muon).
    config.optimizer.muon_exclude = "embed,position,head"

    config.schedule = ml_collections.ConfigDict(
        hparam_fields([getattr(schedules, name) for name in SCHEDULES], DERIVED_SCHEDULE_ARGS))
    config.schedule.name = "warmup_cosine"
    config.schedule.peak_value = config_dict.placeholder(object)  # None: learning_rate
    config.schedule.total_steps = config_dict.placeholder(object)  # None: steps

    config.clip_norm = 1.0              # global-norm clipping after unscaling; 0 = off
    config.ema_decay = 0.0              # EMA of params (fp32); 0 = off
    config.average_from_step = -1       # uniform tail average from this step; -1 = off

    # PaLM-style spike recovery (Chowdhery et al., 2022, Sec. 5.1): when the training loss
    # exceeds spike_factor x the median of the last spike_window losses for spike_patience
    # consecutive steps, restore the last checkpoint from before the spike and skip
    # spike_skip batches.
    config.spike_rollback = False
    config.spike_factor = 2.0
    config.spike_window = 50
    config.spike_patience = 3
    config.spike_skip = 200

    config.spike_max_rollbacks = 5      # rollbacks to one step before the run stops

    # Workdir rules (experiments/runtime/workdir.py): branch a NEW workdir from another run's
    # checkpoint, "DIR" (its latest) or "DIR:STEP": its params, and with
    # init_from_optimizer also its optimizer state, step and data position.
    config.init_from = ""
    config.init_from_optimizer = False
    # Exit status after SIGTERM / SIGINT (the step finishes and a checkpoint is saved):
    # 143 = 128 + SIGTERM, what schedulers that retry failed jobs expect.
    config.preempt_exit_code = 143

    # Workflow (issue 21). Token files: `corpus` may be a .bin (headerless, token_dtype,
    # default uint16) or .npy file of token ids < vocab_size (experiments/runtime/token_files.py);
    # vocab_size None = 256 (bytes), required for token files. Metrics also go to
    # TensorBoard event files in the workdir and, when wandb.project is set, to W&B
    # (experiments/runtime/writers.py). layer_norms: per-group gradient / update / param norms in
    # each logged row (experiments/runtime/layer_norms.py). profile_steps "START,COUNT": a
    # jax.profiler trace of those steps under workdir/plugins/profile.
    config.vocab_size = config_dict.placeholder(int)
    config.token_dtype = config_dict.placeholder(str)  # None: uint16 for .bin (nanoGPT's)
    config.tensorboard = True
    config.layer_norms = True
    config.profile_steps = ""
    config.wandb = ml_collections.ConfigDict(
        {"project": "", "mode": "offline", "entity": "", "name": ""})

    for key, value in VARIANTS[variant].items():
        if isinstance(value, dict):
            config[key].update(value)
        else:
            config[key] = value
    return config
