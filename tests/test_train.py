"""experiments.train: the step logic (in-process) and the script end to end (subprocesses)."""
import dataclasses
import hashlib
import inspect
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from ravine import models
from ravine import optim
from ravine import sharding
from ravine.experiments.runtime import builders, cli, data, preemption, spikes, train_lib
from ravine.experiments.runtime import loop, metrics, run_identity, setup
from ravine.experiments.runtime import workdir as workdir_lib
from ravine.experiments.configs import lm
from tests.scripts import LOCK_HOLDER, Jobs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = models.TransformerConfig(d_model=32, n_layers=1, n_heads=2, max_len=16)


def bigram_loss(params, tokens):
    """A bigram LM (embed -> norm scale -> head): the step logic is model-agnostic, and this
    compiles in a fraction of the transformer's time."""
    x = params["embed"][tokens[:, :-1]] * params["norm"]["scale"]
    return models.cross_entropy(x @ params["head"]["kernel"], tokens[:, 1:])


def tiny_setup(seed=0):
    keys = jax.random.split(jax.random.key(seed), 2)
    params = {"embed": jax.random.normal(keys[0], (256, 16)),
              "norm": {"scale": jnp.ones(16)},
              "head": {"kernel": 0.1 * jax.random.normal(keys[1], (16, 256))}}
    tokens = np.random.default_rng(seed).integers(0, 256, (32, 17)).astype(np.int32)
    return bigram_loss, params, tokens


def transformer_params():
    """Ones shaped like the tiny Transformer's params (paths matter, values do not)."""
    model = models.Transformer(TINY)
    shapes = nn.unbox(jax.eval_shape(model.init, jax.random.key(0),
                                     jnp.zeros((1, 16), jnp.int32)))["params"]
    return jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), shapes)


def leaves_close(a, b, rtol, atol=0.0):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def leaves_equal(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# Jitted once for the file (loss_fn static): op by op, each new shape would compile
# dozens of small programs.
grad_fn = jax.jit(train_lib.mean_loss_and_grad, static_argnums=0)


def one_step(loss_fn, params, tx, batch, loss_scale=None, **kwargs):
    loss_scale = optim.NoOpLossScale() if loss_scale is None else loss_scale
    state = train_lib.init_state(params, tx, loss_scale, **kwargs)
    step = jax.jit(train_lib.make_train_step(loss_fn, tx, optim.schedules.constant(0.0), **kwargs))
    return step(state, batch)


# ----------------------------------------------------------------------------- step logic


def test_grad_accumulation_equals_one_big_batch():
    loss_fn, params, tokens = tiny_setup()
    big_loss, big_grads = grad_fn(loss_fn, params, tokens.reshape(1, 32, 17),
                                  optim.NoOpLossScale())
    micro_loss, micro_grads = grad_fn(loss_fn, params, tokens.reshape(4, 8, 17),
                                      optim.NoOpLossScale())
    np.testing.assert_allclose(micro_loss, big_loss, rtol=1e-5)
    np.testing.assert_allclose(big_loss, loss_fn(params, tokens), rtol=1e-6)
    leaves_close(micro_grads, big_grads, rtol=1e-5, atol=1e-9)
    lr = 1e-2
    tx = optim.adamw(lr, weight_decay=0.1)
    big, _ = one_step(loss_fn, params, tx, tokens.reshape(1, 32, 17))
    micro, _ = one_step(loss_fn, params, tx, tokens.reshape(4, 8, 17))
    big_update = jax.tree.map(jnp.subtract, big.params, params)
    micro_update = jax.tree.map(jnp.subtract, micro.params, params)
    assert max(float(jnp.abs(u).max()) for u in jax.tree.leaves(big_update)) > lr / 2
    leaves_close(micro_update, big_update, rtol=1e-5, atol=1e-5 * lr)


def test_loss_scale_is_fixed_within_an_accumulated_step():
    loss_fn, params, tokens = tiny_setup()
    tx = optax.sgd(0.5)
    # period=1: the scale doubles after every finite step, so once per optimizer step.
    scaled, metrics = one_step(loss_fn, params, tx, tokens.reshape(4, 8, 17),
                               optim.DynamicLossScale(scale=2.0 ** 8, period=1))
    plain, _ = one_step(loss_fn, params, tx, tokens.reshape(4, 8, 17))
    assert float(metrics["loss_scale"]) == 2.0 ** 8
    assert float(scaled.loss_scale.loss_scale) == 2.0 ** 9
    leaves_close(scaled.params, plain.params, rtol=1e-6)


def test_non_finite_gradients_skip_the_step():
    loss_fn, params, tokens = tiny_setup()
    poisoned = lambda p, t: loss_fn(p, t) * jnp.where(t[0, 0] == 255, jnp.nan, 1.0)  # noqa: E731
    tx = optim.adamw(optim.schedules.linear(1e-2, total_steps=10), weight_decay=0.1)
    schedule = optim.schedules.linear(1e-2, total_steps=10)
    kwargs = dict(ema_decay=0.9, average_from_step=0)
    state = train_lib.init_state(params, tx, optim.DynamicLossScale(scale=2.0 ** 4), **kwargs)
    step = jax.jit(train_lib.make_train_step(poisoned, tx, schedule, **kwargs))
    bad = tokens.reshape(1, 32, 17).copy()
    bad[0, 0, 0] = 255
    after, metrics = step(state, bad)
    assert not bool(metrics["finite"]) and not np.isfinite(float(metrics["loss"]))
    for key in ("params", "opt_state", "ema", "average"):
        leaves_equal(getattr(after, key), getattr(state, key))
    assert int(after.step) == 1 and int(after.skipped) == 1
    assert float(after.loss_scale.loss_scale) == 2.0 ** 3
    good = tokens.reshape(1, 32, 17).copy()
    good[0, 0, 0] = 0
    final, metrics = step(after, good)
    assert bool(metrics["finite"]) and int(final.skipped) == 1
    # The skipped step did not advance the optimizer: this update used lr(0).
    np.testing.assert_allclose(float(metrics["lr"]), float(schedule(0)))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(final.params))
    assert not np.array_equal(final.params["head"]["kernel"], params["head"]["kernel"])


def test_clipping_uses_the_pre_clip_global_norm():
    loss_fn, params, tokens = tiny_setup()
    batch = tokens.reshape(1, 32, 17)
    _, grads = grad_fn(loss_fn, params, batch, optim.NoOpLossScale())
    norm = float(optax.tree.norm(grads))
    clip = norm / 10
    state, metrics = one_step(loss_fn, params, train_lib.with_clipping(optax.sgd(1.0), clip),
                              batch)
    np.testing.assert_allclose(float(metrics["grad_norm"]), norm, rtol=1e-6)
    expected = jax.tree.map(lambda p, g: p - clip * g / norm, params, grads)
    leaves_close(state.params, expected, rtol=1e-6, atol=1e-8)
    assert train_lib.with_clipping(optax.sgd(1.0), 0.0) is not None
    with pytest.raises(ValueError, match="-1"):
        train_lib.with_clipping(optax.sgd(1.0), -1.0)


def test_ema_and_tail_average_follow_the_iterates():
    loss_fn, params, tokens = tiny_setup()
    tx = optax.sgd(0.3)
    decay, start = 0.8, 2
    state = train_lib.init_state(params, tx, optim.NoOpLossScale(), decay, start)
    step = jax.jit(train_lib.make_train_step(loss_fn, tx, optim.schedules.constant(0.3),
                                             decay, start))
    ema = jax.tree.map(lambda p: np.asarray(p, np.float64), params)
    tail = []
    for i in range(5):
        batch = np.roll(tokens, i, axis=0).reshape(1, 32, 17)
        state, _ = step(state, batch)
        current = jax.tree.map(lambda p: np.asarray(p, np.float64), state.params)
        ema = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, ema, current)
        if i + 1 >= start:
            tail.append(current)
    leaves_close(state.ema, ema, rtol=1e-5, atol=1e-8)
    assert int(state.average.count) == len(tail) == 4
    mean = jax.tree.map(lambda *xs: sum(xs) / len(xs), *tail)
    leaves_close(state.average.average, mean, rtol=1e-5, atol=1e-8)


def test_eval_step_is_the_mean_loss_over_sub_batches():
    loss_fn, params, tokens = tiny_setup()
    got = jax.jit(train_lib.make_eval_step(loss_fn))(params, tokens.reshape(4, 8, 17))
    want = np.mean([loss_fn(params, part) for part in tokens.reshape(4, 8, 17)])
    np.testing.assert_allclose(got, want, rtol=1e-6)


# ----------------------------------------------------------------------------- config


def tiny_config(**overrides):
    config = lm.get_config("tiny")
    config.steps = 100
    config.optimizer.learning_rate = 0.01
    config.schedule.warmup_steps = 10
    for key, value in overrides.items():
        target = config
        *parents, name = key.split(".")
        for parent in parents:
            target = target[parent]
        target[name] = value
    return config


@pytest.mark.parametrize("variant", sorted(lm.VARIANTS))
def test_variants_build_and_document_a_command(variant):
    config = lm.get_config(variant)
    builders.validate(config)
    model_config = builders.build_model_config(config)
    assert model_config.max_len == config.seq_len and model_config.vocab_size == 256
    builders.build_optimizer(config, builders.build_schedule(config))
    assert f"lm.py:{variant}" in lm.__doc__


def test_config_links_max_len_to_seq_len_and_rejects_unknown_variant():
    config = lm.get_config("tiny")
    config.seq_len = 48
    assert config.model.max_len == 48
    with pytest.raises(ValueError, match="'huge'"):
        lm.get_config("huge")


def test_config_has_a_field_for_every_optimizer_hyperparameter():
    config = lm.get_config("tiny")
    for name in optim.available():
        if hasattr(optim, name):
            for arg in inspect.signature(getattr(optim, name)).parameters:
                assert arg in config.optimizer or arg in lm.DERIVED_HPARAMS, (name, arg)


def test_schedule_defaults_to_the_learning_rate_and_steps():
    schedule = builders.build_schedule(tiny_config())
    np.testing.assert_allclose(float(schedule(10)), 0.01, rtol=1e-6)
    np.testing.assert_allclose(float(schedule(100)), 0.001, rtol=1e-5)  # end = 0.1 peak
    constant = builders.build_schedule(tiny_config(**{"schedule.name": "constant",
                                                   "schedule.warmup_steps": None}))
    np.testing.assert_allclose(float(constant(50)), 0.01)
    wsd = builders.build_schedule(tiny_config(**{"schedule.name": "wsd",
                                              "schedule.decay_steps": 50}))
    np.testing.assert_allclose(float(wsd(50)), 0.01, rtol=1e-6)
    np.testing.assert_allclose(float(wsd(75)), 0.005, rtol=1e-5)


@pytest.mark.parametrize("overrides, message", [
    ({"schedule.name": "cyclic"}, "'cyclic'"),
    ({"schedule.name": "constant"}, "takes no warmup_steps"),
    ({"schedule.name": "cosine_restarts"}, "needs config.schedule.first_period"),
    ({"schedule.warmup_steps": 500}, "500"),
])
def test_bad_schedule_config(overrides, message):
    with pytest.raises(ValueError, match=message):
        builders.build_schedule(tiny_config(**overrides))


@pytest.mark.parametrize("overrides, message", [
    ({"optimizer.name": "adamax"}, "'adamax'"),
    ({"optimizer.name": "adam", "optimizer.momentum": 0.9}, "momentum"),
    ({"optimizer.b1": 1.5}, "1.5"),
    ({"clip_norm": -2.0}, "-2.0"),
    ({"optimizer.name": "shampoo", "optimizer.statistics_dtype": "float99"}, "float99"),
])
def test_bad_optimizer_config(overrides, message):
    config = tiny_config(**overrides)
    with pytest.raises(ValueError, match=message):
        builders.validate(config)
        builders.build_optimizer(config, builders.build_schedule(config))


@pytest.mark.parametrize("field, value", [
    ("steps", 0), ("batch_size", -4), ("grad_accum", 0), ("zero", 4), ("ema_decay", 1.0),
    ("average_from_step", -3), ("loss_scale", "static"), ("spike_factor", 0.5),
])
def test_validate_names_the_field_and_value(field, value):
    with pytest.raises(ValueError, match=rf"config\.{field}.*{value}"):
        builders.validate(tiny_config(**{field: value}))


def test_muon_adam_learning_rate_follows_the_schedule_shape():
    """AdamW leaves of Muon at adam_learning_rate=3e-3 step exactly like a Muon whose main
    learning rate is 3e-3: the same warmup-cosine shape, peaking at 3e-3."""
    params = {"w": jnp.ones((8, 4)), "b": jnp.ones(4)}
    grads = {"w": jnp.full((8, 4), 0.1), "b": jnp.linspace(-1.0, 1.0, 4)}

    def b_updates(**overrides):
        config = tiny_config(**{"optimizer.name": "muon", "clip_norm": 0.0, **overrides})
        tx = builders.build_optimizer(config, builders.build_schedule(config))
        state, out = tx.init(params), []
        for _ in range(15):  # through the warmup and into the decay
            updates, state = tx.update(grads, state, params)
            out.append(updates["b"])
        return np.stack(out)

    np.testing.assert_allclose(
        b_updates(**{"optimizer.learning_rate": 0.03, "optimizer.adam_learning_rate": 3e-3}),
        b_updates(**{"optimizer.learning_rate": 3e-3}), rtol=1e-5)
    # Independent weight decay needs the AdamW schedule's peak: it is adam_learning_rate.
    independent = {"optimizer.weight_decay": 0.5, "optimizer.weight_decay_mode": "independent",
                   "optimizer.no_decay": ""}
    np.testing.assert_allclose(
        b_updates(**{"optimizer.learning_rate": 0.03, "optimizer.adam_learning_rate": 3e-3,
                     **independent}),
        b_updates(**{"optimizer.learning_rate": 3e-3, **independent}), rtol=1e-5)


def test_dtype_hyperparameters_are_given_by_name():
    config = tiny_config(**{"optimizer.name": "shampoo", "optimizer.statistics_dtype":
                            "bfloat16", "clip_norm": 0.0})
    tx = builders.build_optimizer(config, builders.build_schedule(config))
    state = jax.eval_shape(tx.init, {"w": jax.ShapeDtypeStruct((8, 4), jnp.float32)})
    assert any(leaf.dtype == jnp.bfloat16 for leaf in jax.tree.leaves(state))


def test_no_decay_leaves_get_no_weight_decay():
    params = transformer_params()
    config = tiny_config(**{"schedule.name": "constant", "schedule.warmup_steps": None,
                            "clip_norm": 0.0, "optimizer.weight_decay": 0.1})
    tx = builders.build_optimizer(config, builders.build_schedule(config))
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(tx.update)(zero_grads, jax.jit(tx.init)(params), params)
    decayed = {jax.tree_util.keystr(path): bool(np.any(np.asarray(u) != 0))
               for path, u in jax.tree.leaves_with_path(updates)}
    assert not decayed["['embed']['embedding']"]
    assert not decayed["['final_norm']['scale']"]
    assert not decayed["['block_0']['attn_norm']['scale']"]
    assert decayed["['head']['kernel']"] and decayed["['block_0']['mlp']['up']['kernel']"]
    assert decayed["['block_0']['attn']['query']['kernel']"]
    config.optimizer.no_decay = ""
    tx = builders.build_optimizer(config, builders.build_schedule(config))
    updates, _ = jax.jit(tx.update)(zero_grads, jax.jit(tx.init)(params), params)
    assert np.any(np.asarray(updates["embed"]["embedding"]) != 0)


def test_muon_routes_embedding_and_head_to_adam():
    params = transformer_params()
    lr = 0.01
    config = tiny_config(**{"optimizer.name": "muon", "optimizer.learning_rate": lr,
                            "schedule.name": "constant", "schedule.warmup_steps": None,
                            "clip_norm": 0.0})
    tx = builders.build_optimizer(config, builders.build_schedule(config))
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    # Adam's first step is -lr * sign(g) in every entry; Muon's orthogonalised step is not.
    for adam_leaf in (updates["head"]["kernel"], updates["embed"]["embedding"]):
        np.testing.assert_allclose(adam_leaf, -lr, rtol=1e-4)
    muon_leaf = np.asarray(updates["block_0"]["mlp"]["up"]["kernel"])
    assert np.all(np.isfinite(muon_leaf)) and not np.allclose(muon_leaf, -lr, rtol=0.1)


def test_spike_monitor_needs_a_full_window_and_patience():
    monitor = spikes.SpikeMonitor(factor=2.0, window=3, patience=2)
    assert not any(monitor.observe(i, loss) for i, loss in enumerate([9.0, 1.0, 1.2]))
    assert monitor.recent == [9.0, 1.0, 1.2]
    assert not monitor.observe(3, 2.3)           # median 1.2: 2.3 < 2.4 is no spike
    assert monitor.recent == [1.0, 1.2, 2.3]
    assert not monitor.observe(4, 5.0) and monitor.first == 4
    assert monitor.observe(5, float("nan"))      # second spike in a row: roll back
    saved = monitor.state()
    monitor.load({})
    assert monitor.recent == [] and monitor.first == -1
    monitor.load(json.loads(json.dumps(saved)))
    assert monitor.state() == saved and monitor.streak == 2


def test_metrics_log_truncates_and_skips_a_torn_line(tmp_path):
    log = metrics.MetricsLog(str(tmp_path / "m.jsonl"))
    for step in range(1, 6):
        log.write({"step": step, "loss": 1.0 / step})
    with open(log.path, "a") as f:
        f.write('{"step": 6, "lo')       # a kill in the middle of a write
    assert [row["step"] for row in log.rows()] == [1, 2, 3, 4, 5]
    log.truncate(3)
    assert [row["step"] for row in log.rows()] == [1, 2, 3]
    log.write({"step": 4, "loss": 0.5})
    assert [row["step"] for row in log.rows()] == [1, 2, 3, 4]


# ----------------------------------------------------------------------------- the script
# Each test runs `python -m ravine.experiments.train` in subprocesses on 8 emulated CPU devices
# with a tiny model, a 12-step schedule and a small corpus made here.

WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hex "
         "jovial bumpkins and grumpy zebras").split()
RUN = {"steps": 12, "batch_size": 8, "seq_len": 32, "log_every": 1, "eval_every": 6,
       "checkpoint_every": 4, "keep_checkpoints": 5, "eval_batches": 2, "grad_accum": 2,
       "ema_decay": 0.9, "average_from_step": 6, "model.n_layers": 1,
       "schedule.name": "constant", "schedule.warmup_steps": None,
       "optimizer.learning_rate": 3e-3}
RUN_FLAGS = [f"--config.{key}={value}" for key, value in RUN.items()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    rng = np.random.default_rng(0)
    for i in range(24):
        text = " ".join(rng.choice(WORDS, size=300)) + "\n"
        (folder / f"doc{i:02d}.txt").write_text(text)
    return str(folder)


def train_command(workdir, corpus, *flags):
    """The train job's command line; a `--fault=...` flag runs it through tests/fault_train.py
    (the job with a seam patched), the rest go to the job."""
    faults = [flag for flag in flags if flag.startswith("--fault=")]
    module = "tests.fault_train" if faults else "ravine.experiments.train"
    return [sys.executable, "-m", module,
            "--config=experiments/configs/lm.py:tiny", f"--workdir={workdir}",
            f"--config.corpus={corpus}", *RUN_FLAGS, *flags]


ENV = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "8"}


def start(workdir, corpus, *flags, jobs=None):
    """The train job on `flags`, started: a `python -m` process, or the same command as a
    child of `jobs` (the `jobs` fixture: without the seconds of imports)."""
    if jobs is not None:
        return jobs.start(train_command(workdir, corpus, *flags)[2:])
    return subprocess.Popen(train_command(workdir, corpus, *flags), cwd=ROOT, env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run(workdir, corpus, *flags, returncode=0, jobs=None):
    process = start(workdir, corpus, *flags, jobs=jobs)
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == returncode, stderr[-3000:]
    return stderr


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """Runs of the train job (`start(..., jobs=jobs)`), each a child of one process that
    imported what the job imports, and matplotlib, once (tests/scripts.py): a
    `python -m` start is 3-4 s of imports, and a finished run's plot 1-2 s more."""
    server = Jobs(str(tmp_path_factory.mktemp("jobs")), ENV,
                  ["ravine.experiments.runtime.loop", "ml_collections.config_flags",
                   "matplotlib.pyplot"])
    yield server
    server.close()


def rows(workdir):
    return metrics.MetricsLog(os.path.join(workdir, metrics.METRICS_FILE)).rows()


def losses(workdir, key="loss"):
    return {row["step"]: row[key] for row in rows(workdir) if key in row}


@pytest.fixture(scope="module")
def run_setup(corpus):
    """`setup.setup` of the runs' config (RUN): its compiled steps serve each run in this
    process whose config differs from RUN only where the steps do not look (`prepared`)."""
    return setup.setup(tiny_config(corpus=corpus, **RUN))


# Config fields the loop reads and the compiled steps (init, train, eval) and eval batch of
# a `Setup` do not: runs that differ only in these can share a Setup (compiled once).
LOOP_FIELDS = ("log_every", "eval_every", "checkpoint_every", "keep_checkpoints", "init_from",
               "init_from_optimizer", "spike_rollback", "spike_window", "spike_patience",
               "spike_factor", "spike_skip", "spike_max_rollbacks")


def flat(config, prefix=""):
    found = {}
    for key, value in config.items():
        if hasattr(value, "items"):
            found.update(flat(value, f"{prefix}{key}."))
        else:
            found[prefix + key] = value
    return found


def prepared(s, config):
    """`loop.train`'s `prepared` for `config` from the Setup `s` of another config: `s`
    with `config`, checked to differ from `s.config` only in LOOP_FIELDS (and `steps`
    under a constant schedule, whose steps do not depend on the run's length)."""
    config = builders.adapt_to_optimizer(config)
    loop_only = LOOP_FIELDS + (("steps",) if config.schedule.name == "constant" else ())
    ours, theirs = flat(config.to_dict()), flat(s.config.to_dict())
    differ = {key for key in ours.keys() | theirs.keys() if ours.get(key) != theirs.get(key)}
    assert differ <= set(loop_only), sorted(differ - set(loop_only))
    return dataclasses.replace(s, config=config)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, corpus, run_setup):
    """An uninterrupted 12-step run, in this process through `loop.train` (as race does);
    the subprocess runs must reproduce its losses."""
    workdir = str(tmp_path_factory.mktemp("reference"))
    summary = loop.train(run_setup.config, workdir, progress=False, prepared=run_setup)
    return workdir, summary


def tree_digest(folder):
    """Every file under `folder` with its modification time and content hash."""
    found = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                found[os.path.relpath(path, folder)] = (
                    os.stat(path).st_mtime_ns, hashlib.sha256(f.read()).hexdigest())
    return found


@pytest.mark.slow
def test_run_writes_metrics_config_plot_and_checkpoints(reference, corpus):
    reference, summary = reference
    got = rows(reference)
    assert summary["history"] == got and summary["steps"] == 12
    assert summary["final_eval_loss"] == got[-1]["eval_loss"]
    assert summary["final_eval_loss_avg"] == got[-1]["eval_loss_avg"]
    assert [row["step"] for row in got] == list(range(1, 13))
    for row in got:
        assert {"loss", "lr", "grad_norm", "tokens_per_sec", "mfu"} <= set(row)
        assert row["lr"] == pytest.approx(3e-3) and row["skipped_steps"] == 0
    evals = [row for row in got if "eval_loss" in row]
    assert [row["step"] for row in evals] == [6, 12]
    assert all({"eval_loss_ema", "eval_loss_avg"} <= set(row) for row in evals)
    assert evals[-1]["eval_loss"] < got[0]["loss"] - 0.5  # it learns
    with open(os.path.join(reference, run_identity.CONFIG_FILE)) as f:
        config = json.load(f)
    expected = data.load_corpus(corpus)
    assert config["corpus"]["bytes"] == expected.n_bytes
    assert config["corpus"]["sha256"] == expected.sha256
    assert config["config"]["optimizer"]["name"] == "adamw"
    assert os.path.getsize(os.path.join(reference, metrics.PLOT_FILE)) > 1000
    assert sorted(os.listdir(os.path.join(reference, run_identity.CHECKPOINT_DIR))) == ["12", "4", "8"]


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, corpus, jobs):
    """One run of RUN stopped three times and resumed after each stop: the SIGTERM test's
    stop and resume and the SIGKILL test's two kills and resumes in one chain of jobs (each
    start of the job takes seconds). The workdir and what each job left, for both tests."""
    workdir, seen = str(tmp_path_factory.mktemp("interrupted")), {}

    def job(*flags):
        process = start(workdir, corpus, *flags, jobs=jobs)
        _, stderr = process.communicate(timeout=600)
        return process.returncode, stderr

    # 1) SIGTERM while step 6 trains: the step finishes, checkpoint 6 is saved, one line.
    seen["sigterm"] = job("--fault=sigterm_at:6")
    seen["checkpoints after sigterm"] = os.listdir(
        os.path.join(workdir, run_identity.CHECKPOINT_DIR))
    # 2) Resumed from checkpoint 6, then killed by itself right after starting the save of
    #    step 8 (mid-save).
    seen["killed mid-save"] = job("--fault=kill_after_save:8")
    seen["last step after the kill mid-save"] = max(losses(workdir))
    # 3) Resumed, then killed from outside once it has logged step 10.
    process = start(workdir, corpus, jobs=jobs)
    deadline = time.time() + 600
    while max(losses(workdir), default=0) < 10 and process.poll() is None:
        assert time.time() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    # 4) Resumed to the end.
    seen["end"] = job()
    return workdir, seen


@pytest.mark.slow
def test_sigkill_at_any_moment_resumes_to_the_same_losses(reference, interrupted):
    reference, (workdir, seen) = reference[0], interrupted
    # Killed by itself right after starting the save of step 8 (mid-save), resumed, killed
    # from outside once it had logged step 10, resumed to the end (`interrupted`).
    returncode, stderr = seen["killed mid-save"]
    assert returncode == -signal.SIGKILL, stderr[-3000:]
    assert seen["last step after the kill mid-save"] == 8
    returncode, stderr = seen["end"]
    assert returncode == 0, stderr[-3000:]
    assert "resuming" in stderr
    assert losses(workdir) == losses(reference)
    for key in ("eval_loss", "eval_loss_ema", "eval_loss_avg"):
        assert losses(workdir, key) == losses(reference, key)
    assert [row["step"] for row in rows(workdir)] == list(range(1, 13))


@pytest.mark.slow
def test_resume_on_a_different_mesh_with_zero1(reference, corpus, tmp_path, jobs):
    reference, workdir = reference[0], str(tmp_path / "run")
    shutil.copytree(reference, workdir)
    shutil.rmtree(os.path.join(workdir, run_identity.CHECKPOINT_DIR, "12"))  # latest is now 8
    run(workdir, corpus, "--config.mesh=data=2,tensor=4", "--config.zero=1", jobs=jobs)
    want, got = losses(reference), losses(workdir)
    assert sorted(got) == list(range(1, 13))
    for step in range(1, 9):
        assert got[step] == want[step]   # rows up to the checkpoint are kept as they were
    np.testing.assert_allclose([got[s] for s in range(9, 13)], [want[s] for s in range(9, 13)],
                               rtol=1e-4)
    np.testing.assert_allclose(losses(workdir, "eval_loss_avg")[12],
                               losses(reference, "eval_loss_avg")[12], rtol=1e-4)


@pytest.mark.slow
def test_spike_rollback_restores_and_skips_the_bad_batches(corpus, tmp_path, monkeypatch,
                                                           caplog, run_setup):
    """In this process, on RUN's compiled steps: batches 9-11 are random bytes (a spike),
    through the seam tests/fault_train.py's `--fault=corrupt:9:3` patches in the job. The
    job says it rolls back with an absl warning (on stderr at the job's verbosity)."""
    workdir = str(tmp_path)
    batch_at = loop.batch_at

    def corrupted(s, position):
        batch = batch_at(s, position)
        if 9 <= position < 12:
            rows_ = np.random.default_rng(position).integers(0, 256, batch.shape, np.uint8)
            return sharding.shard_batch(rows_, s.mesh, batch_dim=1)
        return batch

    monkeypatch.setattr(loop, "batch_at", corrupted)
    config = config_for(corpus, steps=16, spike_rollback=True, spike_window=3,
                        spike_patience=2, spike_factor=1.3, spike_skip=6)
    loop.train(config, workdir, progress=False, prepared=prepared(run_setup, config))
    assert [record for record in caplog.records if record.levelno == logging.WARNING
            and "rolling back to step 8" in record.getMessage()], caplog.text
    got = rows(workdir)
    assert [row["step"] for row in got] == list(range(1, 17))
    assert got[-1]["rollbacks"] == 1 and got[7]["rollbacks"] == 0
    clean = [row["loss"] for row in got[:8]]
    assert max(row["loss"] for row in got[8:]) < 1.3 * np.median(clean[-3:])
    assert sorted(os.listdir(os.path.join(workdir, run_identity.CHECKPOINT_DIR)),
                  key=int)[-1] == "16"


BAD_FLAGS = [
    (["--config.optimizer.name=adamax"], "adamax"),
    (["--config.schedule.name=cyclic"], "cyclic"),
    (["--config.mesh=data=3"], "data=3"),
    (["--config.optimizer.learning_rate=-1"], "-1"),
    (["--config.corpus=/no/such/corpus"], "/no/such/corpus"),
    (["--config.batch_size=12"], "12"),
    (["--config.optimizer.foo=1"], "foo"),                   # no such config field
    (["--config.steps=abc"], "abc"),                          # not an integer
    (["--config=experiments/configs/lm.py:huge"], "huge"),   # no such variant
    (["--config.model.d_model=128"], "different model"),     # the checkpoint is 64 wide
]


@pytest.mark.slow
def test_bad_flags_exit_2_with_one_line_and_leave_the_run_alone(reference, corpus, tmp_path,
                                                               jobs):
    reference, workdir = reference[0], str(tmp_path / "run")
    shutil.copytree(reference, workdir)
    before = tree_digest(workdir)
    assert jobs.import_noise() == ""  # the part of each job's stderr its imports would print
    for flags, needle in BAD_FLAGS:
        process = start(workdir, corpus, *flags, jobs=jobs)
        stdout, stderr = process.communicate(timeout=600)
        lines = stderr.strip().splitlines()
        assert process.returncode == 2, (flags, stderr[-2000:])
        assert len(lines) == 1 and needle in lines[0], (flags, stderr)
        assert "Traceback" not in stderr
    assert tree_digest(workdir) == before


# ----------------------------------------------------------------------------- the run's rules
# One run per workdir, a resume is the same run, branching with init_from, falling back past
# a damaged checkpoint, stopping instead of looping or training NaN, one line per failure.


def copy_of(reference, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(reference, workdir)
    return workdir


def config_for(folder, **overrides):
    """The subprocess runs' config (RUN) on corpus `folder`, with `overrides`."""
    return tiny_config(**{**RUN, "corpus": folder, **overrides})


def test_changed_fields_follow_the_allow_list_and_the_schedule_length():
    saved = {"seed": 0, "steps": 100, "log_every": 10, "mesh": "data=-1",
             "optimizer": {"name": "adamw", "learning_rate": 1e-3},
             "schedule": {"name": "warmup_cosine", "total_steps": None}}
    same_run = dict(saved, log_every=5, mesh="data=2,tensor=4")
    assert workdir_lib.changed_fields(saved, same_run) == []
    longer = dict(saved, steps=200)  # a cosine over `steps`: every later lr would change
    assert workdir_lib.changed_fields(saved, longer) == [("steps", 100, 200)]
    for schedule in ({"name": "warmup_cosine", "total_steps": 100},
                     {"name": "constant", "total_steps": None}):
        fixed = dict(saved, schedule=schedule)
        assert workdir_lib.changed_fields(fixed, dict(fixed, steps=200)) == []
    other = dict(saved, seed=1, optimizer={"name": "adamw", "learning_rate": 3e-3})
    assert [c[0] for c in workdir_lib.changed_fields(saved, other)] == [
        "optimizer.learning_rate", "seed"]


@pytest.mark.slow
def test_a_resume_with_other_settings_is_refused_listing_them(reference, corpus, tmp_path):
    workdir = copy_of(reference[0], tmp_path)
    before = tree_digest(workdir)
    other_corpus = tmp_path / "other"
    shutil.copytree(corpus, other_corpus)
    (other_corpus / "doc00.txt").write_text("a changed document " * 40)
    for overrides, names in [
            ({"optimizer.learning_rate": 0.01}, ["optimizer.learning_rate"]),
            ({"seed": 1, "steps": 20}, ["seed"]),  # steps may change: constant schedule
            ({"corpus": str(other_corpus)}, ["corpus (SHA-256"]),
            ({"model.d_model": 32}, ["different model", "model.d_model"])]:
        with pytest.raises(cli.UsageError) as error:
            loop.train(config_for(corpus, **overrides), workdir, progress=False)
        message = str(error.value)
        assert all(name in message for name in names), message
        assert "steps 12" not in message  # `steps` may change under a constant schedule
    assert tree_digest(workdir) == before


@pytest.mark.slow
def test_a_second_process_on_a_workdir_exits_2_naming_the_holder(corpus, tmp_path, jobs):
    workdir = str(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, workdir], cwd=ROOT, env=ENV,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        stderr = run(workdir, corpus, returncode=2, jobs=jobs)
        lines = stderr.strip().splitlines()
        assert len(lines) == 1 and f"pid {holder.pid}" in lines[0], stderr
        assert sorted(os.listdir(workdir)) == [workdir_lib.LOCK_FILE]  # nothing written
    finally:
        holder.kill()
        holder.wait()
    with workdir_lib.lock(workdir):  # the kernel released the killed holder's lock
        pass


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["remove", "truncate"])
def test_restore_falls_back_past_a_damaged_checkpoint(reference, corpus, tmp_path, damage,
                                                      capsys, run_setup):
    reference = reference[0]
    workdir = copy_of(reference, tmp_path)
    state_dir = os.path.join(workdir, run_identity.CHECKPOINT_DIR, "12", "state")
    data_files = [os.path.join(root, name) for root, _, names in os.walk(state_dir)
                  for name in names if os.sep + "d" + os.sep in os.path.join(root, name)]
    largest = max(data_files, key=os.path.getsize)
    if damage == "remove":
        os.remove(largest)
    else:
        with open(largest, "r+b") as f:
            f.truncate(os.path.getsize(largest) // 2)
    # keep_checkpoints may change on resume: it does not change the trajectory.
    config = config_for(corpus, keep_checkpoints=4)
    summary = loop.train(config, workdir, progress=False, prepared=prepared(run_setup, config))
    warnings = [line for line in capsys.readouterr().err.splitlines()
                if "cannot be restored" in line]
    assert len(warnings) == 1 and "checkpoint 12" in warnings[0], warnings
    assert summary["steps"] == 12
    assert losses(workdir) == losses(reference)  # retrained 9-12 from checkpoint 8, exactly
    for key in ("eval_loss", "eval_loss_ema", "eval_loss_avg"):
        assert losses(workdir, key) == losses(reference, key)
    assert sorted(os.listdir(os.path.join(workdir, run_identity.CHECKPOINT_DIR)), key=int) == [
        "4", "8", "12"]


@pytest.mark.slow
def test_init_from_branches_a_wsd_decay_that_equals_the_switched_run(corpus, tmp_path,
                                                                     run_setup):
    """A constant-lr (stable) run, branched at step 4 into a WSD decay with its optimizer
    state and data position, equals a run that had the WSD schedule from the start (flat
    at the peak until step 4, then decaying)."""
    wsd = {"schedule.name": "wsd", "schedule.decay_steps": 4}
    short = {"steps": 8, "eval_every": 4}
    stable, branch, whole = (str(tmp_path / name) for name in ("stable", "branch", "whole"))
    config = config_for(corpus, **short)  # RUN's steps (constant lr), shorter
    loop.train(config, stable, progress=False, prepared=prepared(run_setup, config))
    whole_config = config_for(corpus, **short, **wsd)
    wsd_setup = setup.setup(whole_config)  # the branch and the whole run: one WSD step
    config = config_for(corpus, **short, **wsd, init_from=f"{stable}:4", init_from_optimizer=True)
    loop.train(config, branch, progress=False, prepared=prepared(wsd_setup, config))
    loop.train(whole_config, whole, progress=False, prepared=wsd_setup)
    assert sorted(losses(branch)) == [5, 6, 7, 8]
    assert losses(branch) == {s: loss for s, loss in losses(whole).items() if s > 4}
    assert losses(branch, "eval_loss") == {8: losses(whole, "eval_loss")[8]}
    assert losses(whole)[4] == losses(stable)[4]          # the same stable phase
    assert losses(whole)[8] != losses(stable)[8]          # and a different tail
    lrs = {row["step"]: row["lr"] for row in rows(branch)}
    assert lrs[5] == pytest.approx(3e-3) and lrs[8] == pytest.approx(3e-3 / 4)

    # Params only (another optimizer): a fresh optimizer from the trained params.
    lion = str(tmp_path / "lion")
    loop.train(config_for(corpus, **short, init_from=stable,
                           **{"optimizer.name": "lion", "optimizer.learning_rate": 1e-4}),
                lion, progress=False)
    assert sorted(losses(lion))[0] == 1
    assert losses(lion)[1] < losses(stable)[1] - 0.5       # it starts from trained params
    with pytest.raises(cli.UsageError, match="init_from_optimizer"):
        loop.train(config_for(corpus, **short, init_from=stable, init_from_optimizer=True,
                               **{"optimizer.name": "lion"}), str(tmp_path / "x"),
                    progress=False)


@pytest.mark.slow
def test_spike_rollbacks_have_a_budget(corpus, tmp_path, monkeypatch, run_setup):
    """Every batch from position 9 on is noise: rolling back cannot get past the spike."""
    batch_at = loop.batch_at

    def noisy(s, position):
        batch = batch_at(s, position)
        if position >= 9:
            rows_ = np.random.default_rng(position).integers(0, 256, batch.shape, np.uint8)
            return sharding.shard_batch(rows_, s.mesh, batch_dim=1)
        return batch

    monkeypatch.setattr(loop, "batch_at", noisy)
    config = config_for(corpus, steps=16, spike_rollback=True, spike_window=3,
                        spike_patience=2, spike_factor=1.3, spike_skip=2,
                        spike_max_rollbacks=2)
    s = prepared(run_setup, config)  # RUN's steps: the spike is in the data
    with pytest.raises(loop.Diverged, match=r"step 1\d .*after 2 rollbacks to step 8"):
        loop.train(config, str(tmp_path / "a"), progress=False, raise_on_divergence=True,
                   prepared=s)
    assert sorted(os.listdir(tmp_path / "a" / run_identity.CHECKPOINT_DIR), key=int) == ["4", "8"]
    summary = loop.train(config, str(tmp_path / "b"), progress=False,
                         prepared=s)  # as a sweep runs it
    assert summary["diverged"] and summary["rollbacks"] == 2
    assert math.isnan(summary["final_eval_loss"])


@pytest.mark.slow
def test_a_non_finite_loss_without_loss_scaling_stops_the_run(corpus, tmp_path):
    config = config_for(corpus, clip_norm=0.0, **{"optimizer.name": "sgd",
                                                  "optimizer.learning_rate": 1e30})
    with pytest.raises(loop.Diverged, match=r"loss (nan|inf) at step \d+ with no loss scaling"
                       ) as error:
        loop.train(config, str(tmp_path), progress=False, raise_on_divergence=True)
    stopped_at = int(re.search(r"at step (\d+)", str(error.value)).group(1))
    got = losses(str(tmp_path))
    assert max(got) == stopped_at < 12 and not math.isfinite(got[stopped_at])
    assert all(math.isfinite(got[s]) for s in range(1, stopped_at))


def test_fp16_params_with_an_underflowing_eps_are_refused():
    with pytest.raises(ValueError, match=r"eps=1e-08 underflows.*params=float32"):
        builders.validate(tiny_config(precision="half"))
    builders.validate(tiny_config(precision="half", **{"optimizer.eps": 1e-4}))
    builders.validate(tiny_config(precision="params=float32,compute=float16,output=float32"))
    builders.validate(tiny_config(precision="half", **{"optimizer.name": "lion"}))


def test_max_len_is_independent_of_seq_len():
    config = lm.get_config("tiny")
    config.model.max_len = 128
    assert config.seq_len == 64 and builders.build_model_config(config).max_len == 128
    config.model.max_len = 32
    assert config.seq_len == 64
    with pytest.raises(ValueError, match=r"max_len \(32\) must be >= config.seq_len \(64\)"):
        builders.build_model_config(config)


START_ERRORS = [
    (["--config.stepz=3"], "unknown config field 'stepz' in --config.stepz=3; did you mean "
                           "'steps'?"),
    (["--config.model.max_len=16"], "max_len (16) must be >= config.seq_len (32)"),
    (["--config.precision=half"], "params=float32,compute=float16"),
    (["--config.corpus=/dev/null"], "'/dev/null' is a character device"),
    (["--config=no/such/lm.py"], "no/such/lm.py"),
    (["--workdir=/proc/version"], "/proc/version"),
]


@pytest.mark.slow
def test_start_errors_exit_2_with_one_line(corpus, tmp_path, jobs):
    fifo_corpus = tmp_path / "fifo_corpus"
    shutil.copytree(corpus, fifo_corpus)
    os.mkfifo(fifo_corpus / "pipe.txt")  # reading it would block forever
    assert jobs.import_noise() == ""  # the part of each job's stderr its imports would print
    for flags, needle in START_ERRORS + [([f"--config.corpus={fifo_corpus}"], "is a FIFO")]:
        process = start(str(tmp_path / "run"), corpus, *flags, jobs=jobs)
        _, stderr = process.communicate(timeout=600)
        lines = stderr.strip().splitlines()
        assert process.returncode == 2, stderr[-2000:]
        assert len(lines) == 1 and needle in lines[0], stderr
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.slow
def test_a_failed_save_stops_at_its_step_with_one_line(corpus, tmp_path, jobs):
    """Saving checkpoint 8 fails as on a full disk: the run stops there, says so and which
    checkpoint is good, leaves no temporary file, and a re-run says the same."""
    workdir = str(tmp_path)
    lines = []
    for _ in range(2):
        stderr = run(workdir, corpus, "--fault=save_error:8", returncode=1, jobs=jobs)
        assert "Traceback" not in stderr
        lines.append(stderr.strip().splitlines()[-1])
        assert max(losses(workdir)) == 8
        assert sorted(os.listdir(os.path.join(workdir, run_identity.CHECKPOINT_DIR))) == ["4"]
        leftovers = [name for _, dirs, names in os.walk(workdir) for name in dirs + names
                     if "tmp" in name]
        assert leftovers == []
    assert lines[0] == lines[1] == (
        "error: saving checkpoint 8 failed: No space left on device; checkpoint 4 is the "
        "last good one")


@pytest.mark.slow
def test_sigterm_saves_stops_with_one_line_and_resumes_exactly(reference, interrupted):
    # Stopped by SIGTERM at step 6; the jobs after it (`interrupted`) start from its
    # checkpoint 6: every step after 6 comes from the state it saved.
    reference, (workdir, seen) = reference[0], interrupted
    returncode, stderr = seen["sigterm"]
    assert returncode == 143, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == (
        "stopped by SIGTERM at step 6 (checkpoint 6 saved); re-running the same command "
        "resumes from it")
    assert "Traceback" not in stderr
    assert "6" in seen["checkpoints after sigterm"]
    assert f"resuming {workdir} from step 6" in seen["killed mid-save"][1]  # the next job
    returncode, stderr = seen["end"]
    assert returncode == 0, stderr[-3000:]
    assert losses(workdir) == losses(reference)
    assert losses(workdir, "eval_loss_avg") == losses(reference, "eval_loss_avg")


def test_stop_signal_finishes_the_step_then_a_second_one_interrupts():
    stop = preemption.StopSignal()
    before = signal.getsignal(signal.SIGINT)
    with stop.installed():
        assert not stop.reached(1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.reached(2) and stop.name == "SIGTERM"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is before
    assert not preemption.NoStop().reached(3)


@pytest.fixture
def whole_step_sgd():
    """Registers "whole_step_sgd" for one test: an optimizer that brings its own step
    (plain SGD written as a whole step, through its spec's `train_step`)."""
    lr = 0.5

    def make(config):
        fns = builders.make_train_step(config, tx=optax.sgd(lr))

        def train_step(state, batch):
            loss, grads = train_lib.mean_loss_and_grad(fns.loss_fn, state.params, batch,
                                                       fns.loss_scale)
            params = jax.tree.map(lambda p, g: p - lr * g, state.params, grads)
            return state._replace(params=params, step=state.step + 1), {"loss": loss}

        return fns._replace(train_step=train_step)

    def factory(learning_rate):  # the hyperparameters its config fields come from
        return {"learning_rate": learning_rate}

    optim.register("whole_step_sgd", factory, train_step=make)
    yield lr
    optim.unregister("whole_step_sgd")


def test_a_spec_train_step_is_the_seam_for_other_optimizers(whole_step_sgd):
    lr = whole_step_sgd
    assert "whole_step_sgd" not in optim.available()  # not an Optax transform
    assert not optim.spec("whole_step_sgd").vmappable
    config = tiny_config(**{"optimizer.name": "whole_step_sgd", "model.n_layers": 1})
    fns = builders.make_train_step(config)
    # jitted, not op by op (one compile each instead of hundreds: 13 s of the test's 16)
    state = jax.jit(fns.init)(jax.random.key(0))
    tokens = np.random.default_rng(0).integers(0, 256, (1, 4, 65)).astype(np.uint8)
    new, out = jax.jit(fns.train_step)(state, tokens)
    loss, grads = jax.jit(jax.value_and_grad(fns.loss_fn))(state.params, tokens[0])
    np.testing.assert_allclose(out["loss"], loss, rtol=1e-5)
    leaves_close(new.params, jax.tree.map(lambda p, g: p - lr * g, state.params, grads),
                 rtol=1e-5, atol=1e-7)
    # ZeRO-2/3 rebuild an Optax step around a reduce-scattering loss: not this step.
    assert fns.step_for_loss is None
    config.zero = 2
    with pytest.raises(ValueError, match="config.zero=2: optimizer 'whole_step_sgd' takes "
                                         "ZeRO 0 or 1 only"):
        setup.setup(config)
