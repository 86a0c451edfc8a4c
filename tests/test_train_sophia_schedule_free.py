"""Sophia and Schedule-Free AdamW in the train job: the estimate on refresh steps only, the
evaluation at Schedule-Free's x, its schedule, and an end-to-end Sophia run under a kill."""
import functools
import logging
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ravine import models
from ravine import optim
from ravine.experiments.runtime import builders
from ravine.experiments.runtime import loop, setup
from ravine.optim import builtin_specs, sophia_estimates
from ravine.optim.sophia import SophiaState
# The train script's helpers and its small corpus (a module fixture).
from tests.test_train import RUN, corpus, losses, run, tiny_config  # noqa: F401

B, T, K = 8, 16, 2  # rows (one per emulated device), sequence length, micro-batches
# The refresh-step tests' programs (Sophia's step with its estimator, the estimator alone) are
# compiled with XLA's loop emitters instead of its fusion emitters: the same results (both are
# compared here), compiled 3x faster (the Hutchinson step: 7.9 s -> 2.4 s).
FAST_COMPILE = {"xla_cpu_use_fusion_emitters": False}


def small_config(name, **overrides):
    return tiny_config(**{"steps": 10, "batch_size": B, "seq_len": T, "grad_accum": K,
                          "model.n_layers": 1, "clip_norm": 0.0, "optimizer.name": name,
                          "optimizer.learning_rate": 1e-3, "schedule.warmup_steps": 2,
                          **overrides})


def batches(count, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (K, B, T + 1)).astype(np.uint8) for _ in range(count)]


def sophia_state(opt_state):
    (found,) = [node for node in jax.tree.leaves(
        opt_state, is_leaf=lambda n: isinstance(n, SophiaState)) if isinstance(node, SophiaState)]
    return found


def assert_trees_close(a, b, rtol, atol=0.0):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@pytest.mark.parametrize("estimator", ["gnb", "hutchinson"])
def test_sophia_folds_the_estimate_on_refresh_steps_only(estimator):
    """Steps 0 and 3 (hessian_every=3) fold in the estimator's value at the step's params on
    its first micro-batch, with the key of (seed, step); steps 1 and 2 keep h."""
    config = small_config("sophia", **{"optimizer.hessian_every": 3,
                                       "optimizer.estimator": estimator, "seed": 5})
    fns = builders.make_train_step(config)
    apply = models.Transformer(fns.model_config).apply
    step = jax.jit(fns.train_step, compiler_options=FAST_COMPILE)
    # Jitted: flax's init op by op compiles ~80 tiny programs.
    state, b2 = jax.jit(fns.init, compiler_options=FAST_COMPILE)(jax.random.key(5)), 0.99

    @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
    def estimate(params, batch, at):
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(5),
                                                    builtin_specs.SOPHIA_STREAM), at)
        tokens = jnp.asarray(batch[0], jnp.int32)
        if estimator == "gnb":
            grads, _ = sophia_estimates.gnb_gradient(
                lambda p, x: apply({"params": p}, x), params, tokens[:, :-1], key)
            return sophia_estimates.gnb_from_gradient(grads, K * B * T)
        return sophia_estimates.hutchinson(lambda p: fns.loss_fn(p, tokens), params, key)

    # The expected h, in numpy float32 (jnp op by op would compile each op for each shape).
    want = jax.tree.map(lambda p: np.zeros(p.shape, np.float32), state.params)
    for at, batch in enumerate(batches(4)):
        if at % 3 == 0:
            new = estimate(state.params, batch, at)
            want = jax.tree.map(lambda h, e: np.float32(b2) * h + np.float32(1 - b2) * e,
                                want, jax.tree.map(np.asarray, new))
        state, _ = step(state, batch)
        # Hutchinson's H u (forward over reverse) rounds differently inside the step's jit:
        # up to 2e-9 on entries whose sum cancels to ~1e-6 (the typical entry is ~1e-3).
        assert_trees_close(sophia_state(state.opt_state).hessian, want, rtol=2e-3,
                           atol=1e-8)
    assert any(np.abs(leaf).max() > 0 for leaf in jax.tree.leaves(want))


def test_schedule_free_is_evaluated_and_averaged_at_x(corpus):  # noqa: F811
    config = small_config("schedule_free_adamw", corpus=corpus, ema_decay=0.5,
                          **{"schedule.name": "constant", "schedule.warmup_steps": None,
                             "optimizer.warmup_steps": 2, "optimizer.learning_rate": 3e-2})
    s = setup.setup(config)
    state = s.init(jax.random.key(0))
    ema = jax.tree.map(np.asarray, state.params)  # x = y = z at the start
    # Jitted: op by op, each op would compile for each leaf's shape and sharding (~20 programs).
    eval_params = jax.jit(optim.schedule_free_eval_params)
    for position in range(3):
        state, _ = s.train_step(state, loop.batch_at(s, position))
        x = eval_params(state.opt_state, state.params)
        ema = jax.tree.map(lambda e, p: 0.5 * e + 0.5 * np.asarray(p), ema, x)
    assert_trees_close(state.ema, ema, rtol=1e-5, atol=1e-7)
    row = loop.evaluate(s, state)
    with s.in_mesh():
        at_x = float(s.eval_step(x, s.eval_batch))
        at_y = float(s.eval_step(state.params, s.eval_batch))
    # x computed here and in the train job (each in its own jitted program) may differ in the
    # last bit.
    assert row["eval_loss"] == pytest.approx(at_x, rel=1e-6)
    assert row["eval_loss"] != pytest.approx(at_y, rel=1e-4)


def test_schedule_free_refuses_another_schedule():
    config = small_config("schedule_free_adamw")
    with pytest.raises(ValueError, match="config.schedule.name='warmup_cosine': "
                                         "schedule_free_adamw takes a constant"):
        builders.validate(config)


SOPHIA_RUN = {"optimizer.name": "sophia", "optimizer.hessian_every": 3,
              "optimizer.learning_rate": 1e-2, "mesh": "data=4,tensor=2", "zero": 1}


@pytest.mark.slow
def test_sophia_train_job_learns_and_resumes_exactly_after_sigkill(corpus, tmp_path, caplog):  # noqa: F811
    """grad_accum=2 (the run flags of tests/test_train.py), data x tensor sharding, ZeRO-1:
    killed mid-save at step 8, the resumed run's losses equal the uninterrupted run's.
    Only the killed job is a process of its own (a SIGKILL needs one; 8 devices, as here):
    the uninterrupted run and the resume run here, through `loop.train` as the job's main
    calls it, sharing one setup (one trace and compile of the step for both)."""
    reference, killed = str(tmp_path / "reference"), str(tmp_path / "killed")
    config = tiny_config(corpus=corpus, **{**RUN, **SOPHIA_RUN})  # = run()'s flags
    s = setup.setup(config)
    loop.train(config, reference, progress=False, prepared=s)
    want = losses(reference)
    assert want[12] < want[1] - 0.3
    run(killed, corpus, *[f"--config.{key}={value}" for key, value in SOPHIA_RUN.items()],
        "--fault=kill_after_save:8", returncode=-signal.SIGKILL)
    assert max(losses(killed)) == 8
    with caplog.at_level(logging.WARNING):
        loop.train(config, killed, progress=False, prepared=s)
    assert "resuming" in caplog.text
    assert losses(killed) == want
    assert losses(killed, "eval_loss") == losses(reference, "eval_loss")
