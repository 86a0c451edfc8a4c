"""Every test sees 8 emulated CPU devices; this must run before any JAX use."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# As the scripts do (see experiments/__init__.py): LAPACK calls already run side by side.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
