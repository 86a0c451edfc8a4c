"""ravine.optim: optimizers as small composable Optax transforms, schedules, loss scaling.

Each section below belongs to one module; add a module's public names in its own section.
"""
# --- first-order transforms and optimizers (transforms.py, alias.py) ---
from optim.alias import (adafactor, adagrad, adam, adamw, add_decoupled_weight_decay,
                         decay_mask, lion, rmsprop, scale_by_learning_rate, sgd)
from optim.transforms import (scale_by_adafactor, scale_by_adagrad, scale_by_adam,
                              scale_by_lion, scale_by_momentum, scale_by_rms)

# --- schedules (schedules.py), loss scaling (loss_scale.py), weight averaging (averaging.py) ---
from optim import schedules
from optim.averaging import (TailAverage, ema_params, init_average, init_tail_average,
                             tail_average, update_tail_average)
from optim.loss_scale import (DynamicLossScale, NoOpLossScale, StaticLossScale, all_finite,
                              select_tree)

# --- Shampoo and SOAP (shampoo.py, soap.py) ---
from optim.shampoo import scale_by_shampoo, shampoo
from optim.soap import scale_by_soap, soap

# --- Muon (muon.py) ---
from optim.muon import hidden_matrices, muon, scale_by_muon

# --- diagnostics (diagnostics.py): imported as optim.diagnostics ---
from optim import diagnostics

# --- registry (registry.py) ---
from optim.registry import available, create

# --- per-leaf learning-rate multipliers, e.g. μP's (multipliers.py) ---
from optim.multipliers import scale_by_multipliers
