"""ravine's flag-driven scripts: train, race, demos and benchmarks.

On CPU, Shampoo's and SOAP's eigendecompositions run in LAPACK (scipy's OpenBLAS), one
matrix per call, and XLA already runs those calls side by side on every core; OpenBLAS
threads of its own only contend for the same cores (2-core CPU: 16 roots of 512x512 blocks
in 144 ms with one OpenBLAS thread, 343 ms with two; Shampoo on the `small` LM config,
1.67 s/step instead of 2.02). OpenBLAS reads the setting once, when it loads, so it is made
here, before a script imports JAX; one set in the environment wins.
"""
import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
