"""The landscape demo at a tiny size, in-process: every printed number is the computed one.

The printed table is parsed back and checked against values recomputed here from the
returned end points: losses and errors from the loss function, the top eigenvalues from a
dense `eigh` of the exact Hessian, rise@0.5 from the returned loss slices; the verdict's
means and seed counts from those recomputed values.
"""
import contextlib
import io
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from absl import flags
from jax.flatten_util import ravel_pytree

from ravine.experiments.demos import landscape

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--train_examples=64", "--test_examples=128", "--input_dim=4", "--classes=3",
        "--width=8", "--depth=1", "--small_batch=4", "--large_batch=32", "--sgd_lr=0.2",
        "--adam_lr=0.01", "--target_loss=0.4", "--max_steps=3000", "--check_every=10",
        "--num_lanczos=40", "--num_probes=2", "--resolution=5", "--seeds=2"]


def parse_row(line, name):
    """The numbers of a printed table row (the run's name and the error pair split off)."""
    assert line.startswith("  " + name), line
    cells = line[2 + len(name):].split()
    errors = [float(x) for x in cells[6].split("/")]
    numbers = [float(x) for x in cells[:6] + cells[7:]]
    return {"seed": numbers[0], "lr": numbers[1], "steps": numbers[2], "train": numbers[3],
            "test": numbers[4], "gap": numbers[5], "errors": errors, "top": numbers[6:11],
            "mean": numbers[11], "bulk": numbers[12], "negative": numbers[13],
            "rise": numbers[14]}


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("landscape")
    flag_values = flags.FlagValues()
    landscape.define_flags(flag_values)
    flag_values(["landscape", *TINY, f"--outdir={outdir}"])
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = landscape.demo(flag_values)
    return result, printed.getvalue(), outdir


@pytest.mark.slow
def test_printed_numbers_are_the_computed_ones(tiny_demo):
    result, printed, outdir = tiny_demo
    lines = printed.splitlines()
    loss_fn = result["loss_fn"]
    names = list(result["per_seed"][0]["runs"])
    assert names == ["SGD, batch 4", "SGD, batch 32", "Adam, batch 4"]
    top_by_run = {name: [] for name in names}

    @jax.jit
    def dense_hessian(params, batch):
        flat, unravel = ravel_pytree(params)
        return jax.hessian(lambda f: loss_fn(unravel(f), batch))(flat)

    for name in names:
        rows = [line for line in lines if line.startswith("  " + name + " ")]
        assert len(rows) == 2, printed
        for seed, (line, per_seed) in enumerate(zip(rows, result["per_seed"])):
            got, r, task = parse_row(line, name), per_seed["runs"][name], per_seed["task"]
            params = r["params"]
            assert got["seed"] == seed and got["steps"] == r["steps"] and r["reached"]
            train, test = (float(loss_fn(params, data)) for data in (task.train, task.test))
            assert got["train"] == pytest.approx(train, abs=6e-5) and train <= 0.4
            assert got["test"] == pytest.approx(test, abs=6e-5)
            assert got["gap"] == pytest.approx(test - train, abs=1e-4)
            hessian = np.asarray(dense_hessian(params, task.train), np.float64)
            exact = np.linalg.eigvalsh(hessian)[::-1]
            np.testing.assert_allclose(got["top"], exact[:5], rtol=1e-2)
            top_by_run[name].append(exact[0])
            # mean λ and the masses are those of the returned density; the density's mean
            # estimates tr(H)/n (2 probes: a loose check).
            grid, density = r["grid"], r["density"]
            assert got["mean"] == pytest.approx(np.trapezoid(grid * density, grid), rel=6e-3)
            assert got["mean"] == pytest.approx(exact.mean(), rel=0.5)
            assert got["bulk"] == pytest.approx(r["bulk_mass"], abs=6e-4)
            # rise@0.5 from the slices: coords are -1, -0.5, 0, 0.5, 1 (resolution 5).
            line_at = dict(zip(np.round(per_seed["line_coords"], 6), r["slice_train"]))
            at_half = [line_at[-0.5], line_at[0.5], r["surface"][2, 1], r["surface"][2, 3]]
            np.testing.assert_allclose(r["surface"][2, 2], train, rtol=1e-5)
            assert got["rise"] == pytest.approx(np.mean(at_half) - train, rel=6e-3)
    # The verdict quotes the means over seeds of the (recomputed) top eigenvalues, and
    # counts the seeds in which small-batch SGD is the flatter.
    small, large, adam = (np.mean(top_by_run[n]) for n in names)
    verdict = next(line for line in lines if line.startswith("Does small-batch SGD"))
    quoted = re.search(r"top eigenvalue (\S+) vs (\S+) for large-batch SGD \(lower in (\d) of 2",
                       verdict)
    assert float(quoted[1]) == pytest.approx(small, rel=1e-2)
    assert float(quoted[2]) == pytest.approx(large, rel=1e-2)
    assert int(quoted[3]) == sum(a < b for a, b in zip(top_by_run[names[0]],
                                                       top_by_run[names[1]]))
    answer = {2: "Yes", 0: "No", 1: "Mixed"}[int(quoted[3])]
    assert verdict.startswith(f"Does small-batch SGD find flatter minima here? {answer}:")
    adam_line = next(line for line in lines if line.startswith("Does Adam?"))
    assert float(re.search(r"by the top eigenvalue: (\S+) ", adam_line)[1]) == pytest.approx(
        adam, rel=1e-2)
    assert (outdir / "landscape.png").stat().st_size > 1000


def test_bad_batches_exit_2_with_one_line():
    done = subprocess.run([sys.executable, "-m", "ravine.experiments.demos.landscape",
                           "--small_batch=64", "--large_batch=64"], cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--small_batch must be smaller than --large_batch" in lines[0]
