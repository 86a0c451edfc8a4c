"""ravine.sharding on 8 emulated CPU devices: meshes, rules, state shardings, ZeRO-1, steps."""
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import multihost_worker as lm
from ravine import sharding


def specs(tree):
    return jax.tree.map(lambda s: s.spec, tree)


def up(params):
    """The first MLP kernel (embed=32, mlp=80) of the test model's only block."""
    return params["block_0"]["mlp"]["up"]["kernel"]


def down(params):
    """The second MLP kernel (mlp=80, embed=32)."""
    return params["block_0"]["mlp"]["down"]["kernel"]


# Most of this file's time is compiling train steps, and most of an XLA:CPU compile is its
# MLIR fusion emitters making each fusion's kernel. Its older emitters compile the same
# partitioned program (the same collectives: what these tests check) about 3x faster
# (Shampoo's step on data=8: 12.4 s -> 3.1 s of CPU), to the same losses (bit for bit on
# data=8; on every mesh within 0.007 of the tolerance, as with the fusion emitters).
COMPILER_OPTIONS = {"xla_cpu_use_fusion_emitters": False}


# --- make_mesh -------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, shape", [
    ("data=2,fsdp=1,tensor=4", (2, 1, 1, 4)),
    ("tensor=2, data=4", (4, 1, 1, 2)),
    ({"fsdp": 8}, (1, 1, 8, 1)),
    ("data=-1", (8, 1, 1, 1)),
    ({"data": 2, "tensor": -1}, (2, 1, 1, 4)),
    ("stage=4,data=2", (2, 4, 1, 1)),
    ("data=2,stage=2,tensor=2", (2, 2, 1, 2)),
])
def test_make_mesh_builds_all_four_auto_axes(spec, shape):
    mesh = sharding.make_mesh(spec)
    assert mesh.axis_names == ("data", "stage", "fsdp", "tensor")
    assert tuple(mesh.shape.values()) == shape
    assert mesh.axis_types == (AxisType.Auto,) * 4
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())


def test_make_mesh_uses_the_given_devices():
    devices = jax.devices()[2:6]
    mesh = sharding.make_mesh("tensor=-1", devices)
    assert mesh.shape["tensor"] == 4
    assert set(mesh.devices.flat) == set(devices)


@pytest.mark.parametrize("spec, words", [
    ("data=2,tensor=2", ["4", "8"]),
    ({"data": 16}, ["16", "8"]),
    ("data=3,tensor=-1", ["3", "8"]),
    ("dta=8", ["'dta'"]),
    ("data=2,pipeline=4", ["'pipeline'"]),
    ("data=0,tensor=8", ["'data'", "0"]),
    ("data=two", ["'data'", "'two'"]),
    ({"tensor": 2.5}, ["'tensor'", "2.5"]),
    ("data=-1,tensor=-1", ["data", "tensor"]),
    ("data=-2", ["'data'", "-2"]),
    ("data", ["'data'"]),
    ("data=2,data=4", ["'data'"]),
    (8, ["8"]),
])
def test_make_mesh_errors_name_the_problem(spec, words):
    with pytest.raises(ValueError) as err:
        sharding.make_mesh(spec)
    for word in words:
        assert word in str(err.value)


# --- rules and logical_to_shardings --------------------------------------------------------

def test_logical_to_shardings_follows_rules_on_boxed_params_and_eval_shape():
    mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
    shapes = lm.param_shapes()
    boxed = jax.tree.map(lambda box: box.replace_boxed(np.zeros(box.value.shape)), shapes,
                         is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
    from_arrays = sharding.logical_to_shardings(boxed, mesh)
    from_shapes = sharding.logical_to_shardings(shapes, mesh)
    assert jax.tree.structure(from_arrays) == jax.tree.structure(nn.unbox(boxed))
    assert from_arrays == from_shapes
    params = specs(from_shapes)
    block = params["block_0"]
    assert params["embed"]["embedding"] == P("tensor", "fsdp")      # (vocab, embed)
    assert block["mlp"]["up"]["kernel"] == P("fsdp", "tensor")      # column-parallel
    assert block["mlp"]["down"]["kernel"] == P("tensor", "fsdp")    # row-parallel
    assert block["attn"]["query"]["kernel"] == P("fsdp", "tensor")  # (embed, heads, kv)
    assert block["attn"]["out"]["kernel"] == P("tensor", None, "fsdp")  # (heads, kv, embed)
    assert block["attn_norm"]["scale"] == P("fsdp")
    assert all(s.mesh == mesh for s in jax.tree.leaves(from_shapes))


def test_unboxed_leaves_are_replicated_and_mesh_axis_boxes_kept():
    mesh = sharding.make_mesh("data=2,tensor=4")
    tree = {"plain": jnp.zeros((8, 4)),
            "mesh_named": nn.Partitioned(jnp.zeros((8, 4)), names=("data", None)),
            "logical": nn.LogicallyPartitioned(jnp.zeros((8, 4)), names=("embed", "mlp"))}
    got = specs(sharding.logical_to_shardings(tree, mesh))
    assert got == {"plain": P(), "mesh_named": P("data"), "logical": P("fsdp", "tensor")}


def test_rules_override_per_call():
    mesh = sharding.make_mesh("fsdp=4,tensor=2")
    no_fsdp = sharding.override_rules({"embed": None})
    swapped = sharding.override_rules({"mlp": "fsdp", "embed": "tensor"})
    default = specs(sharding.logical_to_shardings(lm.param_shapes(), mesh))
    assert up(default) == P("fsdp", "tensor")
    got = specs(sharding.logical_to_shardings(lm.param_shapes(), mesh, rules=no_fsdp))
    assert up(got) == P(None, "tensor")
    got = specs(sharding.logical_to_shardings(lm.param_shapes(), mesh, rules=swapped))
    assert up(got) == P("tensor", "fsdp")
    assert dict(no_fsdp)["mlp"] == "tensor" and len(no_fsdp) == len(sharding.RULES)
    with pytest.raises(ValueError, match="mapping"):
        sharding.override_rules([("embed", None)])


def test_axes_that_do_not_divide_a_dimension_are_dropped():
    mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
    tree = {"heads6": nn.LogicallyPartitioned(jax.ShapeDtypeStruct((6, 5), jnp.float32),
                                              names=("heads", "embed")),
            "batch": nn.LogicallyPartitioned(jax.ShapeDtypeStruct((6, 4), jnp.float32),
                                             names=("batch", "mlp"))}
    got = specs(sharding.logical_to_shardings(tree, mesh))
    # 6 heads split 2 ways is fine; 5 does not split over fsdp; 6 rows keep only "data".
    assert got == {"heads6": P("tensor"), "batch": P("data", "tensor")}


# --- optimizer-state shardings --------------------------------------------------------------

def lm_params_and_shardings(mesh_spec):
    mesh = sharding.make_mesh(mesh_spec)
    shapes = lm.param_shapes()
    return mesh, nn.unbox(shapes), sharding.logical_to_shardings(shapes, mesh)


def test_adam_state_follows_params_and_counters_are_replicated():
    mesh, params, param_sh = lm_params_and_shardings("data=2,fsdp=2,tensor=2")
    state_sh = sharding.optimizer_state_shardings(optax.adam(1e-3), params, param_sh)
    adam = state_sh[0]
    assert adam.mu == param_sh and adam.nu == param_sh
    assert adam.count == sharding.replicated(mesh)


def test_differently_shaped_state_keeps_the_axes_of_shared_dims():
    mesh, params, param_sh = lm_params_and_shardings("fsdp=4,tensor=2")
    tx = optax.adafactor(1e-3, min_dim_size_to_factor=16)
    factored = sharding.optimizer_state_shardings(tx, params, param_sh)[0]
    state = jax.eval_shape(tx.init, params)[0]
    assert up(state.v_row).shape == (32,)               # rows of the (embed, mlp) kernel
    assert up(factored.v_row).spec == P("fsdp")
    assert up(factored.v_col).spec == P("tensor")
    # optax drops the largest dim for the row factor: (mlp=80, embed=32) -> v_row (32,).
    assert down(state.v_row).shape == (32,)
    assert down(factored.v_row).spec == P("fsdp")
    assert down(factored.v_col).spec == P("tensor")
    assert up(factored.v).spec == P()                   # placeholder of shape (1,)
    assert factored.v["final_norm"]["scale"].spec == P("fsdp")  # unfactored: like the param


def test_state_with_more_dims_than_its_param_is_not_aligned_by_chance():
    mesh, params, param_sh = lm_params_and_shardings("fsdp=4,tensor=2")
    sds = jax.ShapeDtypeStruct
    def at_query(leaf):
        return {"block_0": {"attn": {"query": {"kernel": leaf}}}}

    tree = {"stats": at_query(sds((2, 1, 1, 4, 4), jnp.float32)),   # stacked blocks
            "reduced": at_query(sds((32, 4), jnp.float32))}         # (embed, heads)
    got = specs(sharding.follow_param_shardings(tree, params, param_sh))
    assert got == {"stats": at_query(P()), "reduced": at_query(P("fsdp", "tensor"))}


def test_leaves_outside_the_params_tree_match_by_unique_shape_else_replicated():
    mesh, params, param_sh = lm_params_and_shardings("fsdp=4,tensor=2")
    tree = {"stacked": [jax.ShapeDtypeStruct((32, 80), jnp.float32),   # up and gate agree
                        jax.ShapeDtypeStruct((32, 4, 8), jnp.float32),  # q, k, v agree
                        jax.ShapeDtypeStruct((32,), jnp.float32),       # the norms agree
                        jax.ShapeDtypeStruct((7, 3), jnp.float32)]}     # no param
    got = specs(sharding.follow_param_shardings(tree, params, param_sh))["stacked"]
    assert got == [P("fsdp", "tensor"), P("fsdp", "tensor"), P("fsdp"), P()]


def test_zero1_splits_every_state_leaf_over_data():
    mesh, params, param_sh = lm_params_and_shardings("data=2,fsdp=2,tensor=2")
    tx = optax.adamw(1e-3)
    plain = sharding.optimizer_state_shardings(tx, params, param_sh)[0]
    zero = sharding.optimizer_state_shardings(tx, params, param_sh, zero=1)[0]
    assert zero.count.spec == P()
    # (embed=32, mlp=80) kernel sharded (fsdp, tensor): per-device extents 16 and 40, so
    # "data" goes to the mlp dim, before "tensor" (the outer mesh axis first).
    assert up(plain.mu).spec == P("fsdp", "tensor")
    assert up(zero.mu).spec == P("fsdp", ("data", "tensor"))
    for leaf, spec in zip(jax.tree.leaves(jax.eval_shape(tx.init, params)[0].mu),
                          jax.tree.leaves(specs(zero.nu))):
        assert any("data" in (e if isinstance(e, tuple) else (e,)) for e in spec), spec
    assert jax.tree.leaves(specs(zero)) != jax.tree.leaves(specs(plain))
    with pytest.raises(ValueError, match="zero"):
        sharding.optimizer_state_shardings(tx, params, param_sh, zero=4)


def test_zero1_spec_leaves_arrays_it_cannot_split():
    mesh = sharding.make_mesh("data=8")
    assert sharding.zero1_spec(P(), (), mesh) == P()
    assert sharding.zero1_spec(P(), (6, 3), mesh) == P(None, None)
    assert sharding.zero1_spec(P("data"), (16,), mesh) == P("data")
    assert sharding.zero1_spec(P(), (3, 16, 8), mesh) == P(None, "data", None)
    one = sharding.make_mesh("data=1,tensor=8")
    assert sharding.zero1_spec(P("tensor"), (16,), one) == P("tensor")


def test_zero1_state_bytes_per_device_are_an_eighth():
    _, state, state_sh, _ = lm.setup("adamw", "data=8", zero=1)
    _, replicated_state, _, _ = lm.setup("adamw", "data=8", zero=0)
    total = sum(x.nbytes for x in jax.tree.leaves(state["opt_state"]))
    unsplit = sum(x.nbytes for x, s in zip(jax.tree.leaves(state["opt_state"]),
                                           jax.tree.leaves(state_sh["opt_state"]))
                  if "data" not in jax.tree.leaves(tuple(s.spec)))
    assert unsplit <= 0.01 * total                          # only counters stay whole
    zero_bytes = sharding.bytes_per_device(state["opt_state"])
    full_bytes = sharding.bytes_per_device(replicated_state["opt_state"])
    assert len(zero_bytes) == 8 and set(full_bytes.values()) == {total}
    assert max(zero_bytes.values()) <= total / 8 + unsplit
    # Params themselves stay replicated over data (ZeRO-1 only splits optimizer state).
    assert set(sharding.bytes_per_device(state["params"]).values()) == {
        sum(x.nbytes for x in jax.tree.leaves(state["params"]))}


# --- batches --------------------------------------------------------------------------------

def test_shard_batch_builds_the_global_batch_split_over_data_and_fsdp():
    mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
    batch = {"tokens": np.arange(8 * 3).reshape(8, 3), "weights": np.ones((8,), np.float32)}
    out = sharding.shard_batch(batch, mesh)
    for name in batch:
        np.testing.assert_array_equal(np.asarray(out[name]), batch[name])
        assert out[name].sharding.is_equivalent_to(sharding.batch_sharding(mesh), batch[name].ndim)
    rows = {shard.index[0].indices(8) for shard in out["tokens"].addressable_shards}
    assert len(rows) == 4                                    # 4 row blocks, 2 copies each
    micro = np.arange(2 * 8 * 3).reshape(2, 8, 3)
    stacked = sharding.shard_batch(micro, mesh, batch_dim=1)
    np.testing.assert_array_equal(np.asarray(stacked), micro)
    assert stacked.sharding.spec == P(None, ("data", "fsdp"))
    assert {s.data.shape for s in stacked.addressable_shards} == {(2, 2, 3)}


# --- the jitted train step ------------------------------------------------------------------

def test_jit_train_step_donates_lays_out_state_and_sets_mesh_and_rules():
    mesh = sharding.make_mesh("data=4,tensor=2")
    rules = sharding.override_rules({"length": "tensor"})
    seen = {}

    def step_fn(state, batch):
        seen["rules"] = nn.get_logical_axis_rules()
        seen["mesh"] = jax.sharding.get_abstract_mesh()
        h = nn.with_logical_constraint(batch[..., None] * state["w"], ("batch", "length", "mlp"))
        return {"w": state["w"] + 1.0}, {"mean": jnp.mean(h)}

    state_sh = {"w": NamedSharding(mesh, P("tensor"))}
    step = sharding.jit_train_step(step_fn, mesh, state_sh, sharding.batch_sharding(mesh), rules)
    state = {"w": jax.device_put(jnp.arange(4.0), state_sh["w"])}
    batch = sharding.shard_batch(np.ones((8, 6), np.float32), mesh)
    new_state, metrics = step(state, batch)
    assert state["w"].is_deleted()
    assert new_state["w"].sharding == state_sh["w"]
    assert metrics["mean"].sharding.is_fully_replicated
    np.testing.assert_allclose(np.asarray(new_state["w"]), np.arange(4.0) + 1)
    np.testing.assert_allclose(float(metrics["mean"]), 1.5)
    assert seen["rules"] == rules
    assert dict(seen["mesh"].shape) == {"data": 4, "stage": 1, "fsdp": 1, "tensor": 2}
    hlo = step.lower(new_state, batch).as_text()
    assert "sharding_constraint" in hlo


def collectives(hlo_text):
    """[(op, [result shapes])] for every collective in a compiled HLO module."""
    found = []
    for line in hlo_text.splitlines():
        m = re.search(r"= (.*?) (all-reduce|all-gather|reduce-scatter|all-to-all)(?:-start)?\(",
                      line)
        if m:
            shapes = [tuple(int(d) for d in dims.split(",") if d)
                      for dims in re.findall(r"\w+\[([\d,]*)\]", m.group(1))]
            found.append((m.group(2), shapes))
    return found


def test_tensor_parallel_step_all_reduces_activations_and_never_gathers_params():
    mesh, state, state_sh, step = lm.setup("adamw", "data=2,tensor=4")
    batch = sharding.shard_batch(lm.global_batch(0), mesh)
    # Compiled as train_losses compiles it: the mesh case below loads it from the cache.
    found = collectives(step.lower(state, batch).compile(COMPILER_OPTIONS).as_text())
    activation = (lm.BATCH // 2, lm.SEQ, lm.D_MODEL)   # one data shard's [B, T, D]
    reduced = [s for op, shapes in found if op == "all-reduce" for s in shapes]
    # Row-parallel attention output and MLP down projection (forward), and the
    # column-parallel inputs' gradients (backward): one all-reduce each over "tensor".
    assert reduced.count(activation) >= 4
    tensor_sharded = {x.shape for x, s in zip(jax.tree.leaves(state["params"]),
                                               jax.tree.leaves(state_sh["params"]))
                      if "tensor" in jax.tree.leaves(tuple(s.spec))}
    assert (32, 80) in tensor_sharded and (4, 8, 32) in tensor_sharded
    moved = {s for _, shapes in found for s in shapes}
    assert not moved & tensor_sharded, "a full tensor-parallel param crossed devices"
    gathered = [s for op, shapes in found if op == "all-gather" for s in shapes]
    all_param_shapes = {x.shape for x in jax.tree.leaves(state["params"])}
    assert not set(gathered) & all_param_shapes


# --- same losses on every mesh ------------------------------------------------------------

MESHES = [("data=8", 0), ("data=2,tensor=4", 0), ("fsdp=4,tensor=2", 0),
          ("data=2,fsdp=2,tensor=2", 1)]
# 10 steps: Shampoo refreshes its roots at steps 0, 3, 6 and 9 and preconditions from step 3
# on (multihost_worker.make_optimizer), so seven preconditioned steps are compared, and the
# one-device loss has fallen by 0.8 (AdamW and Shampoo alike), over the 0.5 asked.
STEPS = 10


def train_losses(optimizer, mesh_spec, zero=0, devices=None):
    """`lm.train_losses` for STEPS steps, its step compiled with COMPILER_OPTIONS."""
    return lm.train_losses(optimizer, mesh_spec, zero, STEPS, devices, COMPILER_OPTIONS)


@functools.lru_cache(maxsize=None)
def one_device_losses(optimizer):
    return train_losses(optimizer, "data=1", devices=jax.devices()[:1])


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "shampoo"])
@pytest.mark.parametrize("mesh_spec, zero", MESHES)
def test_meshes_train_to_the_same_losses_as_one_device(optimizer, mesh_spec, zero):
    expected = one_device_losses(optimizer)
    losses = train_losses(optimizer, mesh_spec, zero=zero)
    assert len(losses) == len(expected) == STEPS
    assert expected[-1] < expected[0] - 0.5                     # it does learn
    np.testing.assert_allclose(losses, expected, rtol=1e-4)


@pytest.mark.slow
def test_shampoo_with_eigh_roots_trains_on_a_mesh_like_one_device():
    """The default roots on a mesh: jaxlib 0.10's batched CPU eigh used to deadlock here."""
    expected = one_device_losses("shampoo_eigh")
    np.testing.assert_allclose(train_losses("shampoo_eigh", "data=2,tensor=4"), expected,
                               rtol=1e-4)
