"""The lr_transfer and stability demos: their mechanics at a tiny setting (the claims are in
the demos' output, see README)."""
import os

import numpy as np
import pytest

from ravine.experiments.demos import lr_transfer, stability
from tests.scripts import demo_runs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_CORPUS = os.path.join(REPO, "optim", "shampoo.py")


@pytest.fixture(scope="module")
def transfer():
    return lr_transfer.run(widths=(16, 64), log2_lrs=(-10, -8, -6, -4), steps=24, batch_size=4,
                           seq_len=16, n_layers=1, n_heads=2, eval_batches=2,
                           corpus_path=SMALL_CORPUS)


def test_lr_transfer_prints_the_argmin_and_the_shift(transfer, tmp_path):
    text = lr_transfer.report(transfer)
    rows = lr_transfer.parse_report(text)
    assert set(rows) == {(p, w) for p in ("sp", "mup") for w in (16, 64)}
    for (parametrization, width), (losses, best_log2) in rows.items():
        assert len(losses) == 4
        # The printed optimum is the lr of the lowest printed loss (ties by rounding allowed).
        assert losses[[-10, -8, -6, -4].index(best_log2)] == min(losses), (parametrization, width)
    for parametrization in ("sp", "mup"):
        best = [rows[(parametrization, w)][1] for w in (16, 64)]
        shift = (best[1] - best[0]) // 2  # grid steps of 2 in log2 here
        assert f"{parametrization} optimum shift from width 16 to 64: {shift:+d} grid steps" in text
    # At the base width μP is SP: the same losses.
    np.testing.assert_array_equal(transfer["final"]["sp"][0], transfer["final"]["mup"][0])
    assert os.path.getsize(lr_transfer.plot(transfer, str(tmp_path))) > 1000


def test_lr_transfer_mup_slows_the_hidden_matrices_of_the_wide_model(transfer):
    # At the smallest lr both are far from converged: μP's wide model takes hidden steps 4x
    # smaller than SP's, so it is behind SP there.
    assert transfer["final"]["mup"][1][0] > transfer["final"]["sp"][1][0]


def test_best_index_skips_diverged_runs():
    assert lr_transfer.best_index([3.0, np.nan, 2.5, 2.7]) == 2
    with pytest.raises(ValueError, match="every learning rate diverged"):
        lr_transfer.best_index([np.nan, np.nan])


def test_lr_sensitivity_by_hand():
    # Wortsman et al.: mean of min(loss, initial) minus the best; diverged counts as initial.
    assert stability.lr_sensitivity([3.0, 2.0, np.nan, 6.0], initial_loss=5.0) == pytest.approx(
        (3 + 2 + 5 + 5) / 4 - 2)
    assert stability.lr_sensitivity([2.0, 2.0], initial_loss=5.0) == 0.0


def test_stability_sweep_mechanics(tmp_path):
    result = stability.run(variants=("none", "both"), min_lr=1e-3, max_lr=1e-1, n_lrs=3,
                           steps=12, batch_size=4, seq_len=16, d_model=32, n_layers=1,
                           n_heads=2, eval_batches=2, corpus_path=SMALL_CORPUS)
    np.testing.assert_allclose(result["lrs"], [1e-3, 1e-2, 1e-1])
    for name in ("none", "both"):
        assert result["loss"][name].shape == result["max_logit"][name].shape == (3,)
        assert result["sensitivity"][name] == pytest.approx(
            stability.lr_sensitivity(result["loss"][name], result["initial_loss"]))
        assert np.all(result["max_logit"][name] > 0)
    text = stability.report(result)
    assert "LR sensitivity" in text and "largest attention logit" in text
    assert os.path.getsize(stability.plot(result, str(tmp_path))) > 1000


BAD_FLAGS = [("lr_transfer", "--widths=32,0"), ("stability", "--variants=none,layernorm")]


@pytest.fixture(scope="module")
def bad_flag_runs(tmp_path_factory):
    """Both command lines, run as `python -m` would (tests/scripts.py's `demo_runs`)."""
    return demo_runs(tmp_path_factory.mktemp("jobs"),
                     {(name, flag): (name, [flag]) for name, flag in BAD_FLAGS})


@pytest.mark.parametrize("name, flag", BAD_FLAGS)
def test_demo_bad_flag_exits_2_with_one_line(name, flag, bad_flag_runs):
    done = bad_flag_runs[(name, flag)]
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and flag.split("=")[0] in lines[0], done.stderr


def test_recorded_lr_transfer_run_supports_the_readme():
    # docs/demos/lr_transfer.txt is the output of the full demo (default flags) that the
    # README row quotes. Its printed optimum per width must be the argmin of its printed
    # losses, its shifts must follow from them, and μP's optimum must move no more than SP's
    # (the claim; measured there: SP -2 grid steps, μP +1).
    with open(os.path.join(REPO, "docs", "demos", "lr_transfer.txt")) as f:
        text = f.read()
    rows = lr_transfer.parse_report(text)
    header = next(line for line in text.splitlines() if line.split()[:2] == ["param", "width"])
    grid = [int(cell.removeprefix("2^")) for cell in header.split()[2:-2]]
    widths = sorted({width for _, width in rows})
    assert len(grid) >= 7 and len(widths) >= 4 and widths[-1] >= 8 * widths[0]
    shifts = {}
    for (parametrization, width), (losses, best_log2) in rows.items():
        assert losses[grid.index(best_log2)] == min(losses), (parametrization, width)
    for parametrization in ("sp", "mup"):
        best = [grid.index(rows[(parametrization, w)][1]) for w in (widths[0], widths[-1])]
        shifts[parametrization] = best[1] - best[0]
        assert (f"{parametrization} optimum shift from width {widths[0]} to {widths[-1]}: "
                f"{shifts[parametrization]:+d} grid steps") in text
    assert abs(shifts["mup"]) <= abs(shifts["sp"])
