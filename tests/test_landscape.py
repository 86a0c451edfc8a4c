"""The landscape demo at a tiny size, in-process: every printed number is the computed one.

The printed table is parsed back and checked against values recomputed here from the
returned end points: losses and errors from the loss function, the top eigenvalues from a
dense `eigh` of the exact Hessian, the filter-normalised curvature as d^T H d with that
Hessian, rise@0.5 from the returned loss slices; the intervals and paired tests from those
recomputed values with scipy's own t-test; the verdict's means and seed counts likewise,
and landscape.json holds the same numbers.
"""
import contextlib
import io
import json
import re

import jax
import numpy as np
import pytest
import scipy.stats
from absl import flags
from jax.flatten_util import ravel_pytree

from ravine.experiments.demos import landscape
from ravine.experiments.runtime import cli

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
            "rise": numbers[14], "curvature": numbers[15]}


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


@pytest.fixture(scope="module")
def exact(tiny_demo):
    """Per run name, per seed: the dense Hessian's eigenvalues (descending) at the end point
    and d^T H d along the run's two filter-normalised directions, averaged."""
    result = tiny_demo[0]
    loss_fn = result["loss_fn"]

    @jax.jit
    def dense_hessian(params, batch):
        flat, unravel = ravel_pytree(params)
        return jax.hessian(lambda f: loss_fn(unravel(f), batch))(flat)

    out = {}
    for name in result["per_seed"][0]["runs"]:
        out[name] = []
        for per_seed in result["per_seed"]:
            r = per_seed["runs"][name]
            hessian = np.asarray(dense_hessian(r["params"], per_seed["task"].train), np.float64)
            directions = [np.asarray(ravel_pytree(d)[0], np.float64) for d in r["directions"]]
            out[name].append({"eigenvalues": np.linalg.eigvalsh(hessian)[::-1],
                              "curvature": np.mean([d @ hessian @ d for d in directions])})
    return out


@pytest.mark.slow
def test_printed_numbers_are_the_computed_ones(tiny_demo, exact):
    result, printed, outdir = tiny_demo
    lines = printed.splitlines()
    loss_fn = result["loss_fn"]
    names = list(result["per_seed"][0]["runs"])
    assert names == ["SGD, batch 4", "SGD, batch 32", "Adam, batch 4", "AdamW, batch 4"]
    for name in names:
        # Table rows: the name, then the seed, the lr and the steps (interval and pair
        # lines also start with the name).
        rows = [line for line in lines if re.match(rf"  {re.escape(name)} +\d+ +\S+ +\d+ ", line)]
        assert len(rows) == 2, printed
        for seed, (line, per_seed) in enumerate(zip(rows, result["per_seed"])):
            got, r, task = parse_row(line, name), per_seed["runs"][name], per_seed["task"]
            params = r["params"]
            assert got["seed"] == seed and got["steps"] == r["steps"] and r["reached"]
            train, test = (float(loss_fn(params, data)) for data in (task.train, task.test))
            assert got["train"] == pytest.approx(train, abs=6e-5) and train <= 0.4
            assert got["test"] == pytest.approx(test, abs=6e-5)
            assert got["gap"] == pytest.approx(test - train, abs=1e-4)
            eigenvalues = exact[name][seed]["eigenvalues"]
            np.testing.assert_allclose(got["top"], eigenvalues[:5], rtol=1e-2)
            assert got["curvature"] == pytest.approx(exact[name][seed]["curvature"], rel=1e-2)
            # mean λ and the masses are those of the returned density; the density's mean
            # estimates tr(H)/n (2 probes: a loose check).
            grid, density = r["grid"], r["density"]
            assert got["mean"] == pytest.approx(np.trapezoid(grid * density, grid), rel=6e-3)
            assert got["mean"] == pytest.approx(eigenvalues.mean(), rel=0.5)
            assert got["bulk"] == pytest.approx(r["bulk_mass"], abs=6e-4)
            # rise@0.5 from the slices: coords are -1, -0.5, 0, 0.5, 1 (resolution 5).
            line_at = dict(zip(np.round(per_seed["line_coords"], 6), r["slice_train"]))
            at_half = [line_at[-0.5], line_at[0.5], r["surface"][2, 1], r["surface"][2, 3]]
            np.testing.assert_allclose(r["surface"][2, 2], train, rtol=1e-5)
            assert got["rise"] == pytest.approx(np.mean(at_half) - train, rel=6e-3)
    # AdamW decays the weights Adam keeps: from the same init, on the same batches, to the
    # same loss, its end point is the smaller in norm.
    for per_seed in result["per_seed"]:
        norms = [float(np.linalg.norm(ravel_pytree(per_seed["runs"][n]["params"])[0]))
                 for n in ("Adam, batch 4", "AdamW, batch 4")]
        assert norms[1] < norms[0], norms
    assert (outdir / "landscape.png").stat().st_size > 1000


@pytest.mark.slow
def test_intervals_paired_tests_and_verdict_are_the_recomputed_ones(tiny_demo, exact):
    """Each run's 95% interval, every pair's paired difference and p-value, the orderings,
    the verdict's numbers and landscape.json, from the dense-Hessian values and scipy."""
    result, printed, outdir = tiny_demo
    lines = printed.splitlines()
    names = list(exact)
    values = {"λ1": {n: [e["eigenvalues"][0] for e in exact[n]] for n in names},
              "curvature": {n: [e["curvature"] for e in exact[n]] for n in names}}
    with open(outdir / "landscape.json") as f:
        recorded = json.load(f)
    t975 = scipy.stats.t.ppf(0.975, 1)  # 2 seeds: 1 degree of freedom
    for label, metric in (("λ1", "top_eigenvalue"), ("curvature", "curvature")):
        block = lines.index(f"{label}: mean ± 95% t interval over 2 seeds")
        means = {}
        for i, name in enumerate(names):
            v = np.asarray(values[label][name])
            mean, half = re.fullmatch(rf"  {re.escape(name)}\s+(\S+) ± (\S+)",
                                      lines[block + 1 + i]).groups()
            means[name] = v.mean()
            assert float(mean) == pytest.approx(v.mean(), rel=1e-2)
            assert float(half) == pytest.approx(t975 * v.std(ddof=1) / np.sqrt(2), rel=2e-2,
                                                abs=1e-3)
            stored = recorded["stats"][metric]["runs"][name]
            assert stored["mean"] == pytest.approx(v.mean(), rel=1e-2)
        pair_lines = {}
        for line in lines[block + len(names) + 2:block + len(names) + 2 + 6]:
            key, difference, half, p = re.fullmatch(
                r"  (.+?)\s+([-+]\S+) ± (\S+)  p = (\S+)", line).groups()
            pair_lines[key] = (float(difference), float(half), float(p))
        assert len(pair_lines) == 6  # every pair of the four runs
        p_of = {}
        for key, (difference, half, p) in pair_lines.items():
            a, b = key.split(" - ")
            x, y = np.asarray(values[label][a]), np.asarray(values[label][b])
            assert difference == pytest.approx((x - y).mean(), rel=1e-2, abs=1e-3)
            assert half == pytest.approx(t975 * (x - y).std(ddof=1) / np.sqrt(2), rel=2e-2,
                                         abs=1e-3)
            assert p == pytest.approx(scipy.stats.ttest_rel(x, y).pvalue, rel=2e-2, abs=1e-3)
            assert recorded["stats"][metric]["pairs"][key]["p"] == pytest.approx(p, rel=2e-2,
                                                                                 abs=1e-3)
            p_of[frozenset((a, b))] = p
        # The ordering: runs by mean, '<' exactly where the paired test separates neighbours.
        ordered = sorted(names, key=means.get)
        expected = ordered[0] + "".join(
            (" < " if p_of[frozenset((a, b))] < 0.05 else " ~ ") + b
            for a, b in zip(ordered, ordered[1:]))
        ordering = next(line for line in lines if line.startswith(f"Ordering by {label} "))
        assert ordering.endswith(": " + expected)
        assert recorded["stats"][metric]["ordering"] == expected
    # The verdict quotes the recomputed means and seed counts, and answers by the paired test.
    small, large, adam, adamw = names
    verdict = next(line for line in lines if line.startswith("Does small-batch SGD"))
    quoted = re.search(r"top eigenvalue (\S+) vs (\S+) for large-batch SGD \(lower in (\d) "
                       r"of 2 seeds; paired difference \S+ ± \S+, p = (\S+)\)", verdict)
    top = values["λ1"]
    assert float(quoted[1]) == pytest.approx(np.mean(top[small]), rel=1e-2)
    assert float(quoted[2]) == pytest.approx(np.mean(top[large]), rel=1e-2)
    assert int(quoted[3]) == sum(a < b for a, b in zip(top[small], top[large]))
    p = scipy.stats.ttest_rel(top[small], top[large]).pvalue
    answer = ("Not separated" if p >= 0.05 else
              "Yes" if np.mean(top[small]) < np.mean(top[large]) else "No, sharper")
    assert verdict.startswith(f"Does small-batch SGD find flatter minima here? {answer}:")
    for name, start in ((adam, "Does Adam find sharper minima"),
                        (adamw, "What does AdamW's decay (weight decay 0.1) change?")):
        line = next(line for line in lines if line.startswith(start))
        quoted = float(re.search(r"By the top eigenvalue (\S+) it is", line, re.I)[1])
        assert quoted == pytest.approx(np.mean(top[name]), rel=1e-2)
    # Adam's answer is the paired test against small-batch SGD's top eigenvalue.
    p = scipy.stats.ttest_rel(top[adam], top[small]).pvalue
    answer = ("Not separated" if p >= 0.05 else
              "Yes" if np.mean(top[adam]) > np.mean(top[small]) else "No, flatter")
    assert f"(the seed's claim)? {answer}:" in next(
        line for line in lines if line.startswith("Does Adam"))
    assert recorded["verdict"] == [line for line in lines if line.startswith(
        ("Does ", "What does AdamW", "Ordering by"))]
    assert recorded["weight_decay"] == 0.1 and len(recorded["runs"][adamw]) == 2


def test_bad_batches_exit_2_with_one_line(monkeypatch, capfd):
    # In-process (a new interpreter costs more than the rest of this file's checks but the
    # demo run): the script's `__main__` is `define_flags()` then `cli.run(main)`, whose
    # parser is `cli.parse_flags` on absl's global flags; here the demo's flags go on a fresh
    # `FlagValues` that stands in for them, so nothing else in this process is touched.
    flag_values = flags.FlagValues()
    landscape.define_flags(flag_values)
    monkeypatch.setattr(flags, "FLAGS", flag_values)
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_flags(["landscape", "--small_batch=64", "--large_batch=64"])
    assert exit_info.value.code == 2
    lines = capfd.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "--small_batch must be smaller than --large_batch" in lines[0]
