"""ravine.optim: optimizers as small composable Optax transforms, schedules, loss scaling.

Each section below belongs to one module; add a module's public names in its own section.
"""
# --- first-order transforms and optimizers (transforms.py, alias.py) ---
from ravine.optim.alias import (adafactor, adagrad, adam, adamw, add_decoupled_weight_decay,
                         decay_and_scale, decay_mask, lion, peak_learning_rate, rmsprop,
                         scale_by_learning_rate, sgd)
from ravine.optim.transforms import (scale_by_adafactor, scale_by_adagrad, scale_by_adam,
                              scale_by_lion, scale_by_momentum, scale_by_rms)

# --- schedules (schedules.py), loss scaling (loss_scale.py), weight averaging (averaging.py) ---
from ravine.optim import schedules
from ravine.optim.averaging import (TailAverage, ema_params, init_average, init_tail_average,
                             tail_average, update_tail_average)
from ravine.optim.loss_scale import (DynamicLossScale, NoOpLossScale, StaticLossScale, all_finite,
                              select_tree)

# --- Shampoo and SOAP (shampoo.py, soap.py) ---
from ravine.optim.shampoo import scale_by_shampoo, shampoo
from ravine.optim.soap import scale_by_soap, soap

# --- Muon (muon.py) ---
from ravine.optim.muon import (TORCH_LAYOUT, MuonDimensionNumbers, hidden_matrices, muon,
                        scale_by_muon)

# --- diagnostics (diagnostics.py): imported as optim.diagnostics ---
from ravine.optim import diagnostics

# --- the rest of the Adam family (radam.py, adamw_8bit.py, quantization.py, sophia.py,
# sophia_estimates.py, schedule_free.py) ---
from ravine.optim import quantization, sophia_estimates
from ravine.optim.adamw_8bit import adamw_8bit, scale_by_adam_8bit
from ravine.optim.radam import radam, scale_by_radam
from ravine.optim.schedule_free import (schedule_free, schedule_free_adamw, schedule_free_eval_params,
                                 scale_by_bias_corrected_rms)
from ravine.optim.sophia import scale_by_sophia, sophia

# --- optimizers optax lacks or has only in contrib (ademamix.py, adopt.py, mars.py, kron.py,
# adamsage.py) and the cautious wrapper (cautious.py) ---
from ravine.optim.adamsage import adamsage, scale_by_adamsage
from ravine.optim.ademamix import alpha_schedule, ademamix, b3_schedule, scale_by_ademamix
from ravine.optim.adopt import adopt, scale_by_adopt
from ravine.optim.cautious import cautious, cautious_adamw
from ravine.optim.kron import kron, precond_update_prob_schedule, scale_by_kron
from ravine.optim.mars import mars, scale_by_mars

# --- registry (registry.py) and the built-in optimizers' records (builtin_specs.py) ---
from ravine.optim.registry import (OptimizerSpec, TrainTask, available, create, factory,
                                   register, spec, specs, unregister)
from ravine.optim import registry
from ravine.optim import builtin_specs  # noqa: F401 - registers the built-ins


def __getattr__(name):
    """`optim.<name>` also finds optimizers added with `register` (as scripts look them up)."""
    found = registry.registered(name)
    if found is None:
        raise AttributeError(f"module 'ravine.optim' has no attribute {name!r}")
    return found


# --- per-leaf learning-rate multipliers, e.g. μP's (multipliers.py) ---
from ravine.optim.multipliers import scale_by_multipliers

# --- low-precision params: stochastic rounding (low_precision.py) ---
from ravine.optim.low_precision import apply_updates_stochastic, stochastic_round
