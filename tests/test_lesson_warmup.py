"""The warmup demo's claim (issue 31, item 2) at a small setting, in-process: warmup raises
the largest stable peak lr of the tiny byte LM, and where only the warmed-up run is stable
the run without warmup has the sharpness spike and spends fewer steps below 2/eta_t.

One compiled program trains every lr with and without warmup and measures the sharpness
along the way (`warmup.train`, as the demo's two parts do separately at its defaults).
"""
import os
import subprocess
import sys

import numpy as np
import pytest
from absl import flags

from ravine.experiments.demos import _lr_sweep, warmup
from ravine.experiments.runtime import cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL_CORPUS = os.path.join(REPO, "optim", "shampoo.py")
STEPS, WARMUP_FRACTION = 40, 0.5  # a 20-step warmup
LRS = 2.0 ** np.arange(-3, 0)  # 0.125, 0.25, 0.5
# Six Lanczos probes (step 0, then steps 4 .. 36 every 8, around the warmup's end at 20): the
# probes are most of the run's time, ten (every 4 steps) took half as long again.
PROBE_STEPS = [0, 4, 12, 20, 28, 36]


@pytest.fixture(scope="module")
def measured():
    # The --help run is started first, so that its interpreter start-up overlaps the
    # compile below (the file's budget is about 25 s on 2 quiet cores).
    help_run = subprocess.Popen([sys.executable, "-m", "ravine.experiments.demos.warmup",
                                 "--help"], cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True,
                                env={**os.environ, "JAX_PLATFORMS": "cpu"})
    try:
        batches, held_out = _lr_sweep.make_batches(SMALL_CORPUS, STEPS, 8, 32, 1, seed=0)
        # The Hessian on 4 held-out sequences, 6 Lanczos steps: the Lanczos products are
        # most of the run's time, and the top eigenvalue has converged by then.
        trained = warmup.train(
            warmup.config_of(d_model=32, n_layers=1, n_heads=2, seq_len=32), LRS,
            WARMUP_FRACTION, batches, hessian_batch=held_out[0, :4], probe_steps=PROBE_STEPS,
            num_lanczos=6)
        yield trained, help_run
    finally:
        if help_run.poll() is None:  # the help test did not collect it
            help_run.kill()
            help_run.communicate()


def test_largest_stable_lr_is_the_last_of_the_stable_prefix():
    lrs = [1.0, 2.0, 4.0, 8.0]
    assert warmup.largest_stable(lrs, [True, True, False, True]) == 2.0
    assert warmup.largest_stable(lrs, [True] * 4) == 8.0
    assert warmup.largest_stable(lrs, [False, True, True, True]) is None


def test_warmup_raises_the_largest_stable_lr_and_keeps_the_sharpness_lower(measured):
    trained, _ = measured
    stable = warmup.stability(trained)
    # Measured (seed 0): the loss rises above the untrained model's by 5.43 and 2.44 at lr
    # 0.25 and 0.5 without warmup, never with it: largest stable lr 0.125 -> 0.5 (4x).
    # (Seeds 1 and 2 give the same two lrs.)
    no_warmup, with_warmup = (stable[s]["largest_stable_lr"] for s in warmup.SETTINGS)
    assert no_warmup is not None and with_warmup >= 2 * no_warmup, (no_warmup, with_warmup)
    assert np.all(stable["warmup"]["max_loss_excess"] <= 0)
    only_warmup = stable["warmup"]["stable"] & ~stable["no warmup"]["stable"]
    assert only_warmup.sum() >= 2, only_warmup

    window = PROBE_STEPS[-1]
    summary = warmup.sharpness_summary(trained, PROBE_STEPS, window)
    none, warm = summary["no warmup"], summary["warmup"]
    # Same init, same Hessian batch: the same sharpness at step 0 in every run.
    np.testing.assert_allclose(np.concatenate([none["initial"], warm["initial"]]),
                               none["initial"][0], rtol=1e-5)
    # Where only the warmed-up run is stable (lr 0.25, 0.5), the run without warmup is the
    # sharper and sits above 2/eta_t more often. Measured (seed 0, in conftest.py's
    # environment: 8 emulated devices, XLA without LLVM optimisation): median sharpness over
    # the probed steps 4..36 6.6 and 45.6 without warmup vs 3.7 and 4.0 with it (28.5 at
    # init); below 2/eta_t at 80% and 20% of them vs 100% and 80%; peak 20 and 1322 vs 17
    # and 47. Seeds 1 and 2 agree at both lrs on the medians and the fractions (so they did
    # with probes every 4 steps: medians 7.5 and 18.7 vs 3.1 and 4.7, 67% and 22% vs 100%
    # and 78% at seed 0). Peaks are not asserted: single measurements spike (in another
    # configuration the warmed-up run at lr 0.5 reached 1.2e5 once). Runs at these lrs are
    # chaotic, so other XLA flags, thread pools or vmap sizes give other numbers. (Where
    # both runs are stable, at lr 0.125, warmup is not clearly the flatter here: median 7.7
    # with it vs 8.4 without; 9.8 vs 2.1 with probes every 4 steps.)
    assert (warm["below_threshold"][only_warmup].mean()
            > none["below_threshold"][only_warmup].mean()), (none, warm)
    assert (np.log(warm["median"][only_warmup]).mean()
            < np.log(none["median"][only_warmup]).mean()), (none, warm)
    # eta_t is the schedule the runs trained with: 0 at step 0 of the warmup, the peak
    # at its end; without warmup the peak at step 0.
    eta = trained["warmup"]["eta"]
    assert np.all(eta[:, 0] == 0)
    np.testing.assert_allclose(eta[:, PROBE_STEPS.index(20)], LRS, rtol=1e-6)
    np.testing.assert_allclose(trained["no warmup"]["eta"][:, 0], LRS, rtol=1e-6)


def test_help_prints_the_flags_and_a_bad_flag_exits_2_with_one_line(measured, monkeypatch,
                                                                     capsys):
    _, help_run = measured
    stdout, stderr = help_run.communicate(timeout=120)
    # absl's --help prints the module docstring and the flags, then exits with status 1.
    assert help_run.returncode == 1 and "Traceback" not in stderr, stderr
    assert "Why warmup?" in stdout and "--warmup_fraction" in stdout and "--sharpness_lrs" in stdout
    # The parser `cli.run` hands absl, on the demo's flags: a bad value exits 2 with one line.
    flag_values = flags.FlagValues()
    warmup.define_flags(flag_values)
    monkeypatch.setattr(flags, "FLAGS", flag_values)
    with pytest.raises(SystemExit) as exit_info:
        cli.parse_flags(["warmup", "--warmup_fraction=2"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(lines) == 1 and "--warmup_fraction" in lines[0], lines
