"""Runs psgd_jax's PSGD Kron (the reference of optim/kron.py) and saves its updates.

    python tests/data/kron_reference.py            # writes tests/data/kron_reference.npz

psgd-jax 0.2.9 (PyPI, its last release) no longer imports on current JAX / optax: it
imports `optax._src.clipping` (gone) and its utils use `jax.tree_map` (removed). This
script therefore:

1. makes a scratch virtual environment (a temporary folder, or `--venv DIR`) that sees this
   interpreter's packages (jax, optax, flax, chex, numpy: so the reference runs on exactly
   the JAX that ravine's test runs on, with the same random bits) and pip-installs
   `psgd-jax==0.2.9` there without dependencies;
2. re-runs itself inside it (`--inner`), which adds the missing names back at runtime
   (shims below) before importing `psgd_jax.kron`, runs `kron` on fixed random params and
   gradients for each configuration in CONFIGS, and writes the params, gradients, every
   step's updates and the final preconditioner factors to the .npz that
   tests/test_new_optimizers.py compares against.

Nothing of psgd_jax's code is copied into ravine; it is only installed and called here.
"""
import argparse
import json
import os
import site
import subprocess
import sys
import sysconfig
import tempfile

REFERENCE = "psgd-jax==0.2.9"
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kron_reference.npz")
SHAPES = {"scalar": (), "bias": (4,), "dense": (6, 5), "conv": (2, 3, 4), "row": (1, 3)}
MASK = {"scalar": False, "bias": False, "dense": True, "conv": True, "row": True}
LEARNING_RATE = 0.01
# name -> (steps, psgd_jax `kron` keyword arguments). "defaults" runs past step 46, the
# first step whose balancing draw (probability 0.01) fires with psgd_jax's fixed seed; the
# other puts every other option and layout rule in one run (dense (6, 5) is diagonal for
# min_ndim_triangular=3; conv (2, 3, 4) has triangular 2 and 3, its largest dim diagonal).
CONFIGS = {
    "defaults": (50, {}),
    "options": (20, dict(
        b1=0.0, preconditioner_update_probability=0.3, memory_save_mode="one_diag",
        momentum_into_precond_update=False, preconditioner_lr=0.2,
        preconditioner_init_scale=0.5, max_size_triangular=4, min_ndim_triangular=3,
        weight_decay=0.1, weight_decay_mask=MASK)),
}

def _outer(venv, out):
    subprocess.run([sys.executable, "-m", "venv", venv], check=True)
    venv_python = os.path.join(venv, "bin", "python")
    venv_site = subprocess.run(
        [venv_python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True, capture_output=True, text=True).stdout.strip()
    # The scratch venv sees this interpreter's packages (after its own).
    ours = [sysconfig.get_paths()["purelib"], *site.getsitepackages()]
    with open(os.path.join(venv_site, "ravine_parent.pth"), "w") as f:
        f.write("\n".join(dict.fromkeys(ours)) + "\n")
    subprocess.run([venv_python, "-m", "pip", "install", "--quiet", "--no-deps", REFERENCE],
                   check=True)
    subprocess.run([venv_python, os.path.abspath(__file__), "--inner", "--out", out],
                   check=True)


def _shim():
    """Put back the names psgd-jax 0.2.9 imports that current JAX / optax removed."""
    import types

    import jax
    import optax
    import optax._src

    for old, new in (("tree_map", jax.tree.map), ("tree_leaves", jax.tree.leaves),
                     ("tree_flatten", jax.tree.flatten),
                     ("tree_unflatten", jax.tree.unflatten),
                     ("tree_structure", jax.tree.structure)):
        if not hasattr(jax, old):
            setattr(jax, old, new)
    try:
        import optax._src.clipping  # noqa: F401
    except ImportError:
        clipping = types.ModuleType("optax._src.clipping")
        clipping.__dict__.update({name: getattr(optax, name) for name in dir(optax)
                                  if "clip" in name})
        sys.modules["optax._src.clipping"] = clipping
        optax._src.clipping = clipping


def _inner(out):
    _shim()
    import jax
    import numpy as np
    import optax
    from psgd_jax.kron import kron

    rng = np.random.default_rng(0)
    params = {name: rng.standard_normal(shape).astype(np.float32)
              for name, shape in SHAPES.items()}
    steps = max(n for n, _ in CONFIGS.values())
    grads = [{name: rng.standard_normal(shape).astype(np.float32)
              for name, shape in SHAPES.items()} for _ in range(steps)]
    arrays = {f"params/{name}": value for name, value in params.items()}
    arrays.update({f"grads/{name}": np.stack([g[name] for g in grads]) for name in SHAPES})
    for config, (n, kwargs) in CONFIGS.items():
        tx = kron(LEARNING_RATE, **kwargs)
        p = jax.tree.map(jax.numpy.asarray, params)
        state = tx.init(p)
        update = jax.jit(tx.update)
        history = []
        for g in grads[:n]:
            u, state = update(g, state, p)
            p = optax.apply_updates(p, u)
            history.append(jax.tree.map(np.asarray, u))
        for name in SHAPES:
            arrays[f"{config}/{name}"] = np.stack([u[name] for u in history])
            # The factors after the last step (balanced at step 46 in "defaults").
            for i, factor in enumerate(state[0]["Qs_preconditioners"][name]):
                arrays[f"{config}/factors/{name}/{i}"] = np.asarray(factor)
    arrays["configs"] = np.array(json.dumps(
        {name: {"steps": n, "learning_rate": LEARNING_RATE, "kwargs": kwargs}
         for name, (n, kwargs) in CONFIGS.items()}))
    arrays["versions"] = np.array(json.dumps({
        "reference": REFERENCE, "jax": jax.__version__, "optax": optax.__version__,
        "numpy": np.__version__}))
    np.savez_compressed(out, **arrays)
    print(f"wrote {out}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=OUT)
    parser.add_argument("--venv", help="scratch venv folder (default: a temporary one)")
    parser.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.inner:
        _inner(args.out)
    elif args.venv:
        _outer(args.venv, args.out)
    else:
        with tempfile.TemporaryDirectory() as venv:
            _outer(venv, args.out)


if __name__ == "__main__":
    main()
