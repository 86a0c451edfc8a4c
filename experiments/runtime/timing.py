"""Wall-clock timing of jitted JAX work, shared by the benchmarks.

JAX dispatches asynchronously: a timer must wait for the results (`block_until_ready`),
and the first call of a jitted function compiles, so it is never timed.

    seconds = best_seconds(jitted_fn, x, repeats=5)        # warmed up, best of 5
    carry, per_call = time_calls(step, carry, calls=10)    # carry = step(carry), 10 times
    peak = matmul_flops_per_second()                       # the reference for model FLOP/s
"""
import time

import jax
import jax.numpy as jnp


def time_calls(run, carry, calls):
    """Runs `carry = run(carry)` `calls` times; returns the new carry and seconds per call
    (the carry is ready before the clock starts and after it stops)."""
    jax.block_until_ready(carry)
    start = time.perf_counter()
    for _ in range(calls):
        carry = run(carry)
    jax.block_until_ready(carry)
    return carry, (time.perf_counter() - start) / calls


def best_seconds(fn, *args, repeats=3, warm_up=True):
    """Best wall time of `fn(*args)` over `repeats` calls, each waited for; one untimed
    call first (compilation) unless `warm_up` is False."""
    if warm_up:
        jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best


def matmul_flops_per_second(size=1024):
    """Measured peak: FLOP/s of a float32 [size, size] matmul (best of 5, this process); the
    benchmark and the scaling study report model FLOP/s as a fraction of it."""
    a = jnp.ones((size, size), jnp.float32)
    seconds = best_seconds(jax.jit(lambda x: x @ x), a, repeats=5)
    return 2 * size ** 3 / seconds
