"""ZeRO stages 0-3 over "data" and host offload of the optimizer state, on 8 CPU devices.

The train step is experiments.train_lib's (gradient accumulation, loss scaling, skipping),
wired as experiments/train.py does, with the few ZeRO / offload lines added.
"""
import functools
import re

import jax
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from ravine import models
import multihost_worker as lm
from ravine import optim
from ravine import sharding
from ravine.experiments.runtime import train_lib
from ravine.experiments.runtime.state import TrainState

STEPS, ACCUM = 4, 2
LR = 3e-3
# Most of this file's time is compiling train steps, and most of an XLA:CPU compile is its
# MLIR fusion emitters making each fusion's kernel. Its older emitters compile the same
# partitioned program (the same collectives: what these tests read) 2-3x faster, to the same
# losses (within 0.02 of the tolerances, as with the fusion emitters).
COMPILER_OPTIONS = {"xla_cpu_use_fusion_emitters": False}


class Run:
    """A tiny LM train state and step at one mesh / ZeRO stage / offload setting."""

    def __init__(self, mesh_spec, zero, offload=False):
        self.mesh = mesh = sharding.make_mesh(mesh_spec)
        model, self.tx = lm.make_model(), optim.adamw(LR, weight_decay=1e-2)
        boxed = lm.param_shapes()
        params = lm.host_params(boxed)
        # --- the lines a train job adds for ZeRO and offload ---
        param_sh = sharding.param_shardings_for_zero(
            params, sharding.logical_to_shardings(boxed, mesh), zero)
        grad_sh = sharding.gradient_shardings(params, param_sh, zero)
        loss_fn = sharding.with_sharded_gradients(train_lib.lm_loss(model), param_sh,
                                                 grad_sh)
        opt_sh = sharding.optimizer_state_shardings(self.tx, params, param_sh, zero)
        if offload:
            opt_sh = sharding.host_offload(opt_sh)
        # --------------------------------------------------------
        replicated = sharding.replicated(mesh)
        self.state_sh = TrainState(step=replicated, skipped=replicated, params=param_sh,
                                   loss_scale=optim.NoOpLossScale(), opt_state=opt_sh)
        self.state = jax.jit(
            lambda p: train_lib.init_state(p, self.tx, optim.NoOpLossScale()),
            out_shardings=self.state_sh).lower(params).compile(COMPILER_OPTIONS)(params)
        self.loss_fn = loss_fn
        self.jitted = sharding.jit_train_step(
            train_lib.make_train_step(loss_fn, self.tx, lambda count: LR), mesh,
            self.state_sh, sharding.batch_sharding(mesh, batch_dim=1))

    @functools.cached_property
    def step(self):
        """Compiled once: the same executable is run and inspected."""
        return self.jitted.lower(self.state, self.batch(0)).compile(COMPILER_OPTIONS)

    def batch(self, i):
        """Step i's batch as [ACCUM, BATCH / ACCUM, SEQ + 1] micro-batches."""
        rows = lm.global_batch(i)
        return sharding.shard_batch(rows.reshape(ACCUM, -1, rows.shape[-1]), self.mesh,
                                    batch_dim=1)

    def train(self, steps=STEPS):
        losses = []
        for i in range(steps):
            self.state, metrics = self.step(self.state, self.batch(i))
            losses.append(float(metrics["loss"]))
        return losses

    def gradients(self):
        """The accumulated gradients as the step computes them, their layout left to XLA."""
        def grads(params, batch):
            return train_lib.mean_loss_and_grad(self.loss_fn, params, batch,
                                                optim.NoOpLossScale())[1]
        with jax.set_mesh(self.mesh):
            batch = self.batch(0)
            return jax.jit(grads).lower(self.state.params, batch).compile(COMPILER_OPTIONS)(
                self.state.params, batch)

    def compiled_text(self):
        return self.step.as_text()


@functools.lru_cache(maxsize=None)
def reference_losses():
    return Run("data=8", zero=0).train()


def per_device_bytes(tree):
    return max(sharding.bytes_per_device(tree).values())


def collective_shapes(hlo, op):
    """Result shapes of every `op` (e.g. "reduce-scatter") in a compiled HLO module."""
    shapes = []
    for line in hlo.splitlines():
        m = re.search(rf"= (.*?) {op}(?:-start)?\(", line)
        if m:
            shapes += [tuple(int(d) for d in dims.split(",") if d)
                       for dims in re.findall(r"\w+\[([\d,]*)\]", m.group(1))]
    return shapes


def over_data(named_sharding):
    return "data" in jax.tree.leaves(tuple(named_sharding.spec))


@pytest.mark.slow
@pytest.mark.parametrize("zero", [0, 1, 2, 3])
def test_zero_stage_trains_like_zero0_with_the_papers_memory(zero):
    run = Run("data=8", zero)
    n = 8
    psi = sum(x.size for x in jax.tree.leaves(run.state.params))
    # Per device, fp32 params with AdamW (Rajbhandari et al. 2020, Fig. 1, K = 8 bytes).
    expected = {"params": 4 * psi / (n if zero >= 3 else 1),
                "grads": 4 * psi / (n if zero >= 2 else 1),
                "opt_state": 8 * psi / (n if zero >= 1 else 1)}
    measured = {"params": per_device_bytes(run.state.params),
                "grads": per_device_bytes(run.gradients()),
                "opt_state": per_device_bytes(run.state.opt_state)}
    overhead = 64   # AdamW's step counters
    for key in expected:
        assert abs(measured[key] - expected[key]) <= 0.1 * expected[key] + overhead, (
            key, measured[key], expected[key])

    hlo = run.compiled_text()
    param_shapes = {x.shape for x in jax.tree.leaves(run.state.params)}
    scattered = collective_shapes(hlo, "reduce-scatter")
    gathered = set(collective_shapes(hlo, "all-gather")) & param_shapes
    if zero >= 2:
        assert scattered, "ZeRO-2/3 gradients should be reduce-scattered"
    if zero == 0:
        assert not scattered and not gathered
    if zero == 3:
        # Every weight matrix is gathered where it is used (norm scales may be fused away).
        assert {s for s in param_shapes if len(s) >= 2} <= gathered
    else:
        assert not any(map(over_data, jax.tree.leaves(run.state_sh.params)))

    np.testing.assert_allclose(run.train(), reference_losses(), rtol=1e-5)


@pytest.mark.slow
def test_zero2_on_a_three_axis_mesh_trains_alike():
    """data=2,fsdp=2,tensor=2: the gradients are laid out by a constraint (see
    sharding.zero._partial_manual_supported) and still split over "data"."""
    run = Run("data=2,fsdp=2,tensor=2", zero=2)
    assert all(map(over_data, jax.tree.leaves(sharding.gradient_shardings(
        run.state.params, run.state_sh.params, 2))))
    grads = run.gradients()
    assert all(map(over_data, [x.sharding for x in jax.tree.leaves(grads)]))
    np.testing.assert_allclose(run.train(), reference_losses(), rtol=1e-4)


def test_zero_stages_shard_grads_and_params_like_the_state():
    mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
    params = lm.host_params(lm.param_shapes())
    param_sh = sharding.logical_to_shardings(lm.param_shapes(), mesh)
    up = lambda t: t["block_0"]["mlp"]["up"]["kernel"]            # noqa: E731 (32, 80)
    state = sharding.optimizer_state_shardings(optax.adam(1e-3), params, param_sh, zero=1)
    for zero in (0, 1):
        assert sharding.param_shardings_for_zero(params, param_sh, zero) is param_sh
        assert sharding.gradient_shardings(params, param_sh, zero) is param_sh
    zero2 = sharding.gradient_shardings(params, param_sh, 2)
    zero3 = sharding.param_shardings_for_zero(params, param_sh, 3)
    assert up(zero2).spec == up(zero3).spec == up(state[0].mu).spec == P(
        "fsdp", ("data", "tensor"))
    assert sharding.param_shardings_for_zero(params, param_sh, 2) is param_sh
    # At zero=3 the state follows the already-split params and is split no further.
    state3 = sharding.optimizer_state_shardings(optax.adam(1e-3), params, zero3, zero=3)
    assert jax.tree.leaves(state3[0].mu) == jax.tree.leaves(zero3)
    for bad in (4, -1, True, "2"):
        with pytest.raises(ValueError, match="zero"):
            sharding.gradient_shardings(params, param_sh, bad)


def test_zero3_over_data_holds_the_bytes_fsdp_does():
    zero3 = Run("data=8", zero=3)
    fsdp = Run("fsdp=8", zero=0)
    for key in ("params", "opt_state"):
        assert per_device_bytes(getattr(zero3.state, key)) == per_device_bytes(
            getattr(fsdp.state, key)), key


def test_with_sharded_gradients_keeps_the_loss_and_its_gradient():
    mesh = sharding.make_mesh("data=8")
    sh = {"w": NamedSharding(mesh, P("data"))}

    def loss_fn(params, rows):                                   # a mean over rows
        return jax.numpy.mean((rows @ params["w"]) ** 2)

    wrapped = sharding.with_sharded_gradients(loss_fn, {"w": sharding.replicated(mesh)}, sh)
    params = {"w": np.arange(16.0, dtype=np.float32)}
    x = np.random.default_rng(0).normal(size=(32, 16)).astype(np.float32)
    with jax.set_mesh(mesh):
        loss, grads = jax.jit(jax.value_and_grad(wrapped))(
            params, sharding.shard_batch(x, mesh))
    expected_loss, expected = jax.value_and_grad(loss_fn)(params, x)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-6)
    np.testing.assert_allclose(grads["w"], expected["w"], rtol=1e-6)
    assert grads["w"].sharding.spec == P("data")


# --- host offload -----------------------------------------------------------------------

@pytest.mark.slow
def test_offloaded_optimizer_state_stays_on_the_host_and_trains_alike():
    run = Run("data=8", zero=1, offload=True)
    kinds = {x.sharding.memory_kind for x in jax.tree.leaves(run.state.opt_state)}
    assert kinds == {sharding.HOST}
    losses = run.train()
    kinds = {x.sharding.memory_kind for x in jax.tree.leaves(run.state.opt_state)}
    assert kinds == {sharding.HOST}
    assert {x.sharding.memory_kind for x in jax.tree.leaves(run.state.params)} == {"device"}
    np.testing.assert_allclose(losses, reference_losses(), rtol=1e-5)


class _Memory:
    def __init__(self, kind):
        self.kind = kind


class _DeviceWithoutHostMemory:
    id, platform = 0, "fake"

    def addressable_memories(self):
        return [_Memory("device")]


def test_offload_without_a_host_memory_kind_is_a_clear_error():
    with pytest.raises(ValueError, match="pinned_host.*only \\['device'\\]"):
        sharding.check_host_memory([_DeviceWithoutHostMemory()])
    sharding.check_host_memory(jax.devices())   # CPU devices do have pinned_host


# --- the train job's config path ----------------------------------------------------------

def train_setup(tmp_path, **fields):
    from ravine.experiments.runtime import setup
    from ravine.experiments.configs import lm as lm_config
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def f(x):\n    return x + 1\n" * 400)
    config = lm_config.get_config("tiny")
    config.corpus, config.steps = str(corpus), 4
    config.schedule.warmup_steps = 1
    for key, value in fields.items():
        config[key] = value
    return setup.setup(config)


@pytest.mark.parametrize("zero, offload", [(3, True), (2, False)])
def test_train_config_lays_out_zero_and_offload(tmp_path, zero, offload):
    s = train_setup(tmp_path, mesh="data=8", zero=zero, offload_optimizer_state=offload)
    state = s.abstract_state
    kinds = {x.sharding.memory_kind for x in jax.tree.leaves(state.opt_state)}
    assert kinds == ({sharding.HOST} if offload else {"device"})
    params = jax.tree.leaves(state.params)
    split = [over_data(x.sharding) for x in params]
    assert all(split) if zero == 3 else not any(split)
