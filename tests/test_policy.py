"""Dtype policy parsing (jmp's grammar) and casting of floating leaves only."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ravine import models

F32, BF16, F16 = np.dtype(jnp.float32), np.dtype(jnp.bfloat16), np.dtype(jnp.float16)


@pytest.mark.parametrize("spec,expected", [
    ("params=float32,compute=bfloat16,output=float32", (F32, BF16, F32)),
    ("p=f32,c=bf16,o=f32", (F32, BF16, F32)),
    ("p = f32 , c = f16", (F32, F16, F16)),   # output follows compute
    ("c=bf16", (F32, BF16, BF16)),            # params default to float32
    ("p=bf16", (BF16, BF16, BF16)),           # compute follows params
    ("o=bf16", (F32, F32, BF16)),
    ("full", (F32, F32, F32)),
    ("bf16", (BF16, BF16, BF16)),
    ("float16", (F16, F16, F16)),
    ("p=full,c=half", (F32, F16, F16)),        # half is float16 off TPU (tests run on CPU)
])
def test_parses_jmp_style_specs(spec, expected):
    policy = models.get_policy(spec)
    assert (policy.param_dtype, policy.compute_dtype, policy.output_dtype) == expected


def test_str_round_trips_and_policy_is_hashable():
    policy = models.get_policy("p=f32,c=bf16,o=f16")
    assert str(policy) == "params=float32,compute=bfloat16,output=float16"
    assert models.get_policy(str(policy)) == policy
    assert models.get_policy(policy) is policy
    assert hash(policy) == hash(models.Policy(jnp.float32, jnp.bfloat16, jnp.float16))


@pytest.mark.parametrize("spec,match", [
    ("p=f32,compute=float8", "unknown dtype 'float8'"),
    ("fp32", "unknown dtype 'fp32'"),
    ("params=f32,weights=bf16", "unknown policy key 'weights'"),
    ("p=f32,c", "'c' .*not of the form key=dtype"),
    ("p=f32,params=bf16", "'params' is given twice"),
    (32, "32"),
])
def test_bad_specs_raise_naming_the_culprit(spec, match):
    with pytest.raises(ValueError, match=match):
        models.get_policy(spec)


def test_non_floating_dtype_is_rejected():
    with pytest.raises(ValueError, match="compute_dtype.*int32"):
        models.Policy(jnp.float32, jnp.int32, jnp.float32)


@pytest.mark.parametrize("method,dtype", [
    ("cast_to_param", F32), ("cast_to_compute", BF16), ("cast_to_output", F16)])
def test_casts_touch_only_floating_leaves(method, dtype):
    policy = models.get_policy("p=f32,c=bf16,o=f16")
    floats = jax.random.normal(jax.random.key(0), (4, 3), jnp.float32)
    tree = {"w": floats, "half": floats.astype(jnp.float16), "ids": jnp.arange(3),
            "mask": jnp.array([True, False]), "step": 7, "name": "layer"}
    cast = getattr(policy, method)(tree)
    assert jax.tree.structure(cast) == jax.tree.structure(tree)
    assert cast["w"].dtype == dtype and cast["half"].dtype == dtype
    np.testing.assert_array_equal(cast["w"], floats.astype(dtype))
    assert cast["ids"].dtype == tree["ids"].dtype and cast["mask"].dtype == bool
    assert cast["step"] == 7 and cast["name"] == "layer"


def test_casts_work_under_jit():
    policy = models.get_policy("c=bf16")
    out = jax.jit(policy.cast_to_compute)({"x": jnp.ones(3), "n": jnp.arange(3)})
    assert out["x"].dtype == BF16 and out["n"].dtype == jnp.arange(3).dtype


@pytest.mark.parametrize("spec,matmul", [
    ("p=f32,c=bf16,o=f32", "compute"),           # default: matmuls in the compute dtype
    ("p=f32,c=bf16,o=f32,matmul=fp8", "fp8"),
    ("c=bf16,m=fp8", "fp8"),
    ("p=f32,c=bf16,matmul=compute", "compute"),
])
def test_matmul_key_parses_and_round_trips(spec, matmul):
    policy = models.get_policy(spec)
    assert policy.matmul == matmul
    assert models.get_policy(str(policy)) == policy
    assert ("matmul" in str(policy)) == (matmul != "compute")  # default str unchanged


@pytest.mark.parametrize("spec,match", [
    ("c=bf16,matmul=int8", "unknown matmul 'int8'"),
    ("c=bf16,m=fp8,matmul=fp8", "'matmul' is given twice"),
])
def test_bad_matmul_specs_raise(spec, match):
    with pytest.raises(ValueError, match=match):
        models.get_policy(spec)
    with pytest.raises(ValueError, match="matmul must be one of"):
        models.Policy(jnp.float32, jnp.bfloat16, jnp.float32, matmul="fp4")
