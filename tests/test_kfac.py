"""experiments.kfac: K-FAC through kfac-jax (shims, layer registration, the K-FAC/Adam gap)."""
import importlib.metadata

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from ravine import models

kfac_jax = pytest.importorskip("kfac_jax", reason="kfac-jax is the extra ravine[kfac]")
from ravine.experiments.runtime import kfac  # noqa: E402

# The K-FAC paper's deep autoencoder (Martens & Grosse 2015, Sec. 13), scaled to a CPU test:
# 64 -> 32 -> 16 -> 8 -> 16 -> 32 -> 64, tanh, sigmoid cross-entropy on binary inputs whose
# columns are on with probabilities spread over two orders of magnitude (badly conditioned).
SIZES = (64, 32, 16, 8, 16, 32, 64)


def autoencoder_problem():
    rng = np.random.default_rng(0)
    scales = np.exp(rng.uniform(-2, 2, SIZES[0]))
    data = (rng.random((2048, SIZES[0])) * scales / scales.max() > 0.3).astype(np.float32)
    key = jax.random.key(0)
    params = []
    for fan_in, fan_out in zip(SIZES[:-1], SIZES[1:]):
        key, sub = jax.random.split(key)
        params.append({"w": jax.random.normal(sub, (fan_in, fan_out)) / np.sqrt(fan_in),
                       "b": jnp.zeros(fan_out)})
    return params, data


def reconstruct(params, x):
    for i, layer in enumerate(params):
        x = x @ layer["w"] + layer["b"]
        x = jnp.tanh(x) if i < len(params) - 1 else x
    return x


def loss(params, x):
    return optax.sigmoid_binary_cross_entropy(reconstruct(params, x), x).sum(-1).mean()


def registered_loss(params, x):
    logits = reconstruct(params, x)
    kfac_jax.register_sigmoid_cross_entropy_loss(logits, x)
    return loss(params, x)


def batches(data, steps, size=256):
    return [data[(i * size) % len(data):(i * size) % len(data) + size] for i in range(steps)]


def steps_to(losses, target):
    return next((i + 1 for i, value in enumerate(losses) if value <= target), None)


def test_shims_are_checked_against_the_installed_version(monkeypatch):
    assert kfac.check_kfac_jax() is kfac_jax
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.0.9")
    with pytest.raises(RuntimeError, match="0.0.9 is installed"):
        kfac.check_kfac_jax()


def test_bad_hyperparameters_name_the_value():
    for kwargs, match in (({"damping": -1.0}, "damping"), ({"momentum": 1.0}, "momentum"),
                          ({"inverse_update_period": 0}, "inverse_update_period")):
        with pytest.raises(ValueError, match=match):
            kfac.KfacOptimizer(registered_loss, **kwargs)


@pytest.mark.slow
def test_kfac_needs_far_fewer_steps_than_tuned_adam_on_the_deep_autoencoder():
    params, data = autoencoder_problem()
    kfac_steps, adam_steps = 150, 400
    full_loss = jax.jit(loss)

    optimizer = kfac.KfacOptimizer(registered_loss, adaptive=True, damping=1.0)
    key = jax.random.key(0)
    # kfac-jax donates the params it steps from: K-FAC gets a copy.
    p = jax.tree.map(jnp.copy, params)
    state = optimizer.init(p, key, data[:256])
    kfac_losses = []
    for step, batch in enumerate(batches(data, kfac_steps)):
        p, state, _ = optimizer.step(p, state, key, batch, step)
        kfac_losses.append(float(full_loss(p, data)))
    target = kfac_losses[-1]

    best_adam = None
    for lr in (1e-2, 3e-2, 1e-1):  # Adam's best lr is inside this grid (checked below)
        tx = optax.adam(lr)

        @jax.jit
        def adam_step(p, s, x, tx=tx):
            grads = jax.grad(loss)(p, x)
            updates, s = tx.update(grads, s, p)
            return optax.apply_updates(p, updates), s

        p, s, losses = params, tx.init(params), []
        for batch in batches(data, adam_steps):
            p, s = adam_step(p, s, batch)
            losses.append(float(full_loss(p, data)))
        if best_adam is None or losses[-1] < best_adam[1][-1]:
            best_adam = (lr, losses)
    lr, adam_losses = best_adam
    assert lr != 1e-1, 'widen the grid: Adam is best at its edge'
    reached = steps_to(adam_losses, target)
    # K-FAC reaches `target` in kfac_steps; Adam at its best lr needs at least twice that.
    assert reached is None or reached >= 2 * kfac_steps, (lr, reached, target)
    assert min(adam_losses) > target, (lr, min(adam_losses), target)


def test_transformer_layers_are_registered_and_kfac_lowers_the_lm_loss():
    config = models.TransformerConfig(d_model=32, n_layers=1, n_heads=2, max_len=16)
    model = models.Transformer(config)
    tokens = np.random.default_rng(0).integers(0, 256, (8, 17)).astype(np.int32)
    params = nn.unbox(model.init(jax.random.key(0), tokens[:, :-1]))["params"]
    optimizer = kfac.KfacOptimizer(kfac.lm_loss(model), learning_rate=3e-2)
    key = jax.random.key(1)
    state = optimizer.init(params, key, tokens)
    blocks = optimizer.registrations()
    # Every 2-D and 3-D kernel (attention included) gets a Kronecker-factored block; the
    # attention projections' factors span d_model and heads * head_dim.
    for path, block in blocks.items():
        if path.endswith("['kernel']"):
            assert block == "KernelDenseBlock", (path, block)
    assert blocks["['embed']['embedding']"] != "KernelDenseBlock"
    estimator = optimizer._optimizer._estimator  # noqa: SLF001
    query = jax.tree.leaves(estimator.params_block_index)[
        list(blocks).index("['block_0']['attn']['query']['kernel']")]
    factor_shapes = [f.value.shape for f in state.estimator_state.blocks_states[query].factors]
    assert factor_shapes == [(32, 32), (32, 32)]

    first = None
    for step in range(8):
        params, state, value = optimizer.step(params, state, key, tokens, step)
        first = float(value) if first is None else first
    assert float(kfac.lm_loss(model)(params, tokens)) < first - 0.5


# ----------------------------------------------------------------------------- the train job

KFAC_RUN = ["--config.optimizer.name=kfac", "--config.optimizer.learning_rate=3e-3",
            "--config.schedule.name=constant",
            "--config.schedule.warmup_steps=None", "--config.steps=12", "--config.batch_size=8",
            "--config.seq_len=32", "--config.model.n_layers=1", "--config.log_every=1",
            "--config.eval_every=6", "--config.checkpoint_every=4", "--config.eval_batches=2",
            "--config.optimizer.inverse_update_period=3", "--config.optimizer.damping=1e-2"]


def _train(workdir, *flags, module="ravine.experiments.train", returncode=0):
    import os, subprocess, sys  # noqa: E401, PLC0415
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    process = subprocess.run(
        [sys.executable, "-m", module, "--config=experiments/configs/lm.py:tiny",
         f"--workdir={workdir}", *KFAC_RUN, *flags], cwd=root, capture_output=True, text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=600)
    assert process.returncode == returncode, process.stderr[-3000:]
    return process.stderr


def _losses(workdir):
    import json, os  # noqa: E401, PLC0415
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {row["step"]: row["loss"] for row in map(json.loads, f)}


@pytest.mark.slow
def test_train_job_with_kfac_learns_and_resumes_exactly_after_sigkill(tmp_path):
    import signal  # noqa: PLC0415
    reference, killed = str(tmp_path / "reference"), str(tmp_path / "killed")
    stderr = _train(reference)
    # K-FAC's spec: its step takes no global-norm clipping; the job turns it off, saying so.
    assert "warning: optimizer kfac does not support config.clip_norm=1.0; running with " \
        "0.0" in stderr
    # The embedding is no dense layer to kfac-jax's scanner: the run says so.
    assert "K-FAC: no layer found for ['embed']['embedding']; preconditioned by" in stderr
    losses = _losses(reference)
    assert losses[12] < losses[1] - 0.5  # K-FAC lowers the tiny LM's loss
    _train(killed, "--fault=kill_after_save:8", module="tests.fault_train",
           returncode=-signal.SIGKILL)
    assert "resuming" in _train(killed)
    assert _losses(killed) == losses  # the K-FAC state (factors, inverses, age) is restored


def test_kfac_config_errors_name_the_field():
    from ravine.experiments.runtime import builders  # noqa: PLC0415
    from ravine.experiments.configs import lm  # noqa: PLC0415
    config = lm.get_config("tiny")
    config.optimizer.name = "kfac"
    with pytest.raises(ValueError, match="config.clip_norm=1.0"):
        builders.make_train_step(config)
    config.clip_norm = 0.0
    config.optimizer.b1 = 0.9
    with pytest.raises(ValueError, match="kfac' takes no b1"):
        builders.make_train_step(config)
