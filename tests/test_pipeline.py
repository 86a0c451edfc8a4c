"""models.pipeline on 8 emulated CPU devices: GPipe over "stage", composed with data/tensor."""
import functools
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from ravine import models
from ravine import optim
from ravine import sharding
from ravine.experiments.runtime import train_lib
from ravine.experiments.runtime.state import TrainState
from ravine.models import pipeline
from tests.scripts import Jobs

CONFIG = models.TransformerConfig(vocab_size=48, d_model=16, n_layers=8, n_heads=2, d_ff=32,
                                  max_len=8)
BATCH, SEQ, MICRO, STEPS, LR = 8, 8, 4, 4, 3e-3
# Most of this file's time is compiling, and most of an XLA:CPU compile is its MLIR fusion
# emitters making each fusion's kernel. Its older emitters compile the same partitioned
# program (the same collective-permutes and loops: what these tests read) 2-3x faster, to
# the same losses (within 0.003 of the tolerance, as with the fusion emitters).
COMPILER_OPTIONS = {"xla_cpu_use_fusion_emitters": False}


def boxed_params(config=CONFIG):
    return jax.eval_shape(models.Transformer(config).init, jax.random.key(0),
                          jnp.zeros((1, config.max_len), jnp.int32))["params"]


def host_params(config=CONFIG):
    """Unstacked initial params (numpy, so no sharded RNG program is compiled per mesh)."""
    rng = np.random.default_rng(0)

    def one(path, x):
        if "norm" in jax.tree_util.keystr(path):
            return np.ones(x.shape, np.float32)
        return rng.normal(0.0, 0.2, x.shape).astype(np.float32)

    return jax.tree.map_with_path(one, nn.unbox(boxed_params(config)))


def batch(step):
    rng = np.random.default_rng(step)
    start, stride = rng.integers(0, 48, (BATCH, 1)), rng.integers(1, 4, (BATCH, 1))
    return ((start + stride * np.arange(SEQ + 1)) % 48).astype(np.int32)[None]   # [1, B, T+1]


def pipelined_loss(params, tokens):
    tokens = tokens.astype(jnp.int32)
    logits = pipeline.apply(CONFIG, params, tokens[:, :-1], microbatches=MICRO)
    return models.cross_entropy(logits, tokens[:, 1:])


def setup(mesh_spec, tx, zero=0):
    """(compiled step, state, mesh) for the pipelined model (stacked params) on `mesh_spec`."""
    mesh = sharding.make_mesh(mesh_spec)
    params = pipeline.stack_blocks(host_params())
    param_sh = sharding.param_shardings_for_zero(
        params, sharding.logical_to_shardings(pipeline.stack_blocks(boxed_params()), mesh), zero)
    replicated = sharding.replicated(mesh)
    state_sh = TrainState(
        step=replicated, skipped=replicated, params=param_sh, loss_scale=optim.NoOpLossScale(),
        opt_state=sharding.optimizer_state_shardings(tx, params, param_sh, zero))
    state = jax.jit(lambda p: train_lib.init_state(p, tx, optim.NoOpLossScale()),
                    out_shardings=state_sh).lower(params).compile(COMPILER_OPTIONS)(params)
    step = sharding.jit_train_step(train_lib.make_train_step(pipelined_loss, tx, lambda c: LR),
                                   mesh, state_sh, sharding.batch_sharding(mesh, batch_dim=1))
    first = sharding.shard_batch(batch(0), mesh, batch_dim=1)
    return step.lower(state, first).compile(COMPILER_OPTIONS), state, mesh


def train(compiled, state, mesh):
    losses = []
    for i in range(STEPS):
        state, metrics = compiled(state, sharding.shard_batch(batch(i), mesh, batch_dim=1))
        losses.append(float(metrics["loss"]))
    return losses


@functools.lru_cache(maxsize=None)
def one_device_losses():
    """The plain (unstacked, unpipelined) Transformer with AdamW on one device."""
    model, tx = models.Transformer(CONFIG), optim.adamw(LR)
    loss_fn = train_lib.lm_loss(model)
    state = train_lib.init_state(jax.device_put(host_params(), jax.devices()[0]), tx,
                                 optim.NoOpLossScale())
    step = jax.jit(train_lib.make_train_step(loss_fn, tx, lambda c: LR)).lower(
        state, batch(0)).compile(COMPILER_OPTIONS)
    losses = []
    for i in range(STEPS):
        state, metrics = step(state, batch(i))
        losses.append(float(metrics["loss"]))
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("mesh_spec, stages, zero", [
    ("stage=4,data=2", 4, 1), ("stage=2,tensor=2,data=2", 2, 0), ("stage=8", 8, 0)])
def test_pipeline_trains_like_one_device_and_runs_m_plus_s_minus_1_ticks(mesh_spec, stages,
                                                                         zero):
    compiled, state, mesh = setup(mesh_spec, pipeline.per_layer(optim.adamw(LR)), zero)
    stacked = jax.tree.leaves(state.params[pipeline.BLOCKS])
    assert all(x.sharding.spec[0] == "stage" for x in stacked)     # one slice per stage
    assert {s.data.shape[0] for x in stacked for s in x.addressable_shards} == {8 // stages}

    hlo = compiled.as_text()
    assert "collective-permute" in hlo
    trips = [int(n) for n in re.findall(r'known_trip_count":\{"n":"(\d+)"', hlo)]
    # The forward schedule and its transpose: two loops of M + S - 1 ticks.
    assert trips.count(MICRO + stages - 1) >= 2, trips

    losses = train(compiled, state, mesh)
    expected = one_device_losses()
    assert expected[-1] < expected[0]
    np.testing.assert_allclose(losses, expected, rtol=1e-4)


def test_stack_and_unstack_round_trip_and_name_the_layer_axis():
    params = host_params()
    stacked = pipeline.stack_blocks(params)
    assert stacked["blocks"]["mlp"]["up"]["kernel"].shape == (8, 16, 32)
    jax.tree.map(np.testing.assert_array_equal, pipeline.unstack_blocks(stacked), params)
    boxed = pipeline.stack_blocks(boxed_params())["blocks"]["attn"]["query"]["kernel"]
    assert boxed.names == ("layers", "embed", "heads", "kv")
    assert boxed.value.shape == (8, 16, 2, 8)
    with pytest.raises(ValueError, match="block_"):
        pipeline.stack_blocks({"embed": params["embed"]})


def test_apply_without_a_stage_axis_is_the_plain_model():
    params, tokens = host_params(), batch(0)[0, :, :-1]
    def run(apply, params):
        return jax.jit(apply).lower(params, tokens).compile(COMPILER_OPTIONS)(params, tokens)

    expected = run(models.Transformer(CONFIG).apply, {"params": params})
    model = pipeline.Pipelined(CONFIG, microbatches=2)
    got = run(model.apply, {"params": pipeline.stack_blocks(params)})
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    boxed = jax.eval_shape(model.init, jax.random.key(0), tokens)["params"]
    assert jax.tree.map(lambda b: b.value.shape, pipeline.stack_blocks(boxed_params()),
                        is_leaf=lambda x: isinstance(x, nn.Partitioned)) == jax.tree.map(
        lambda b: b.value.shape, boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))


@pytest.mark.parametrize("mesh_spec, n_layers, rows, micro, numbers", [
    ("stage=8", 4, 8, 4, ["n_layers=4", "stage=8"]),
    ("stage=4,data=2", 8, 8, 3, ["8", "microbatches=3"]),
])
def test_bad_divisibility_names_both_numbers(mesh_spec, n_layers, rows, micro, numbers):
    config = models.TransformerConfig(vocab_size=48, d_model=16, n_layers=n_layers, n_heads=2,
                                      d_ff=32, max_len=8)
    params = jax.eval_shape(
        lambda: pipeline.stack_blocks(nn.unbox(models.Transformer(config).init(
            jax.random.key(0), jnp.zeros((1, SEQ), jnp.int32))["params"])))
    tokens = jax.ShapeDtypeStruct((rows, SEQ), jnp.int32)
    with jax.set_mesh(sharding.make_mesh(mesh_spec)), pytest.raises(ValueError) as err:
        jax.eval_shape(lambda p, t: pipeline.apply(config, p, t, microbatches=micro),
                       params, tokens)
    for number in numbers:
        assert number in str(err.value)
    with pytest.raises(ValueError, match="microbatches"):
        pipeline.check_divisible(8, 1, 8, 0)


# Elementwise AdamW, and the three whose maths depends on a leaf's shape (Muon's routing,
# Shampoo's and SOAP's blocking); the other elementwise ones behave as AdamW does.
OPTIMIZERS = {
    "adamw": lambda: optim.adamw(1e-2, weight_decay=0.1, mask=optim.decay_mask),
    "muon": lambda: optim.muon(1e-2),
    "shampoo": lambda: optim.shampoo(1e-2, block_size=8, precondition_every=1,
                                     start_preconditioning_step=1, inverse_root="eigh"),
    "soap": lambda: optim.soap(1e-2, precondition_every=1, max_precond_dim=16),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_per_layer_makes_the_unstacked_updates(name):
    """The layer axis is a batch axis: stacked params get exactly the unstacked updates."""
    tx = OPTIMIZERS[name]()
    config = models.TransformerConfig(vocab_size=16, d_model=16, n_layers=2, n_heads=2,
                                      d_ff=16, max_len=4)
    # Made with numpy: Flax's init run eagerly compiles each of its ops apart (3 s of CPU).
    params = host_params(config)
    stacked_tx = pipeline.per_layer(tx)

    def run(tx, params, stack):
        def one_step(carry, step):
            params, state = carry
            # The same made-up gradient of the unstacked params in both runs.
            flat = pipeline.unstack_blocks(params) if stack else params
            grads = jax.tree.map(
                lambda p: jnp.sin(p * (step + 1.7) + jnp.arange(p.size).reshape(p.shape)), flat)
            if stack:
                grads = pipeline.stack_blocks(grads)
            updates, state = tx.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), updates

        steps = jnp.arange(3, dtype=jnp.float32)   # one scan: the update is compiled once
        run = jax.jit(lambda p: jax.lax.scan(one_step, (p, tx.init(p)), steps)[1])
        # The older emitters round the elementwise optimizers' stacked and unstacked updates
        # less alike (AdamW came to 0.7 of the tolerance below, Muon to 1.7x it, against
        # 1e-2 with the fusion emitters), so those two keep the fusion emitters (named, in
        # case XLA_FLAGS turns them off); Shampoo's and SOAP's differences stay under 1e-2
        # of theirs either way.
        options = (COMPILER_OPTIONS if name in ("shampoo", "soap")
                   else {"xla_cpu_use_fusion_emitters": True})
        return run.lower(params).compile(options)(params)

    plain = run(tx, params, stack=False)
    stacked = run(stacked_tx, pipeline.stack_blocks(params), stack=True)
    # Eigendecompositions of a batch of matrices round differently from one at a time: for
    # Shampoo and SOAP the updates (of size ~lr = 1e-2) agree to 5e-6, the others to 1e-7.
    atol = 5e-6 if name in ("shampoo", "soap") else 1e-7
    for i in range(3):
        jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=2e-5, atol=atol),
                     pipeline.unstack_blocks(jax.tree.map(lambda x: x[i], stacked)),
                     jax.tree.map(lambda x: x[i], plain))


def test_zero2_around_the_pipeline_is_refused():
    mesh = sharding.make_mesh("stage=4,data=2")
    params = pipeline.stack_blocks(host_params())
    param_sh = sharding.logical_to_shardings(pipeline.stack_blocks(boxed_params()), mesh)
    loss_fn = sharding.with_sharded_gradients(
        pipelined_loss, param_sh, sharding.gradient_shardings(params, param_sh, 2))
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
        with pytest.raises(ValueError, match="zero <= 1"):
            jax.eval_shape(jax.grad(loss_fn), params, batch(0)[0])


def test_unsupported_optimizers_are_refused_in_one_line():
    """Whether the per-layer split can take an optimizer comes from its spec (an extra
    update argument, eval params of its own, a step of its own), never from its name."""
    from ravine import optim
    from ravine.experiments.configs import lm
    from ravine.experiments.runtime import builders
    for name in ("sophia", "schedule_free_adamw"):
        config = lm.get_config("tiny")
        config.mesh, config.optimizer.name = "stage=2,data=4", name
        with pytest.raises(ValueError, match=f"optimizer '{name}' cannot run with pipeline "
                                             "stages: its") as err:
            builders.build_optimizer(config, builders.build_schedule(config))
        assert "\n" not in str(err.value)
    assert "its own train step" in optim.spec("kfac").pipeline_blocker()
    assert optim.spec("shampoo").pipeline_blocker() is None


TRAIN_JOB_CASES = [
    (["--config.mesh=stage=4,data=2", "--config.model.n_layers=6"], ["n_layers=6", "4"]),
    (["--config.mesh=stage=2,data=4", "--config.microbatches=3"], ["16", "microbatches=3"]),
]

@pytest.fixture(scope="module")
def train_job_results(tmp_path_factory):
    """{flags: (exit status, stderr)} of a train job run on each case's flags: children of
    one process that imported the job once (tests/scripts.py's `Jobs`; a `python -m` start
    spends most of its 3 s of CPU importing the job before it reads a flag)."""
    folder = tmp_path_factory.mktemp("train_jobs")
    corpus = folder / "corpus.txt"
    corpus.write_text("x = 1\n" * 1000)
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "8"}
    jobs = Jobs(str(folder), env, ["ravine.experiments.runtime.loop",
                                   "ml_collections.config_flags"])
    try:
        assert jobs.import_noise() == ""  # what the imports print would lead each stderr
        done = {tuple(flags): jobs.run(["ravine.experiments.train",
                                        "--config=experiments/configs/lm.py:tiny",
                                        f"--config.corpus={corpus}",
                                        f"--workdir={folder / f'run{i}'}", *flags])
                for i, (flags, _) in enumerate(TRAIN_JOB_CASES)}
    finally:
        jobs.close()
    return {flags: (job.returncode, job.stderr) for flags, job in done.items()}


@pytest.mark.parametrize("flags, numbers", TRAIN_JOB_CASES)
def test_train_job_exits_2_naming_both_numbers(train_job_results, flags, numbers):
    returncode, stderr = train_job_results[tuple(flags)]
    assert returncode == 2, stderr[-2000:]
    line, = stderr.strip().splitlines()
    for number in numbers:
        assert number in line
