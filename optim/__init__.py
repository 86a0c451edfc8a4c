"""ravine.optim: optimizers as small composable Optax transforms, schedules, loss scaling.

Each section below belongs to one module; add a module's public names in its own section.
"""
# --- first-order transforms and optimizers (transforms.py, alias.py) ---

# --- schedules (schedules.py), loss scaling (loss_scale.py), weight averaging (averaging.py) ---

# --- Shampoo and SOAP (shampoo.py, soap.py) ---

# --- Muon (muon.py) ---

# --- diagnostics (diagnostics.py): imported as optim.diagnostics ---

# --- registry (registry.py) ---
from optim.registry import available, create
