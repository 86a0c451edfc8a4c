"""Host offload: arrays kept in host RAM (JAX memory kinds) and brought in for the step.

A `NamedSharding` carries a memory kind: "device" (accelerator memory, the default) or
"pinned_host" (page-locked host RAM that the device can DMA from). `host_offload` moves a
tree of shardings to "pinned_host"; `jit_train_step` sees such shardings in the state,
copies those leaves to device memory at the start of the step and its `out_shardings`
copy the new values back, so the step function itself never deals with memory kinds.
Used for the optimizer state (the largest tree with AdamW: 8 bytes per param), as in
ZeRO-Offload (Ren et al., 2021, arXiv:2101.06840) but with the update on the device.

Example::

    opt_sh = sharding.host_offload(sharding.optimizer_state_shardings(tx, params, param_sh))
"""
from collections.abc import Iterable
from typing import Any

import jax

HOST = "pinned_host"
DEVICE = "device"


def check_host_memory(devices: Iterable[jax.Device]) -> None:
    """Raises ValueError unless every device in `devices` can address "pinned_host" memory."""
    for device in devices:
        kinds = [memory.kind for memory in device.addressable_memories()]
        if HOST not in kinds:
            raise ValueError(
                f"host offload needs a {HOST!r} memory kind, but device {device} "
                f"({device.platform}) has only {kinds}; run without offloading")


def host_offload(shardings: Any) -> Any:
    """`shardings` (a tree of `NamedSharding`) moved to host memory ("pinned_host").

    Raises ValueError (saying which memory kinds exist) where the backend has no host
    memory kind.
    """
    leaves = jax.tree.leaves(shardings)
    devices = {d for s in leaves for d in s.mesh.devices.flat}
    check_host_memory(sorted(devices, key=lambda d: d.id))
    return jax.tree.map(lambda s: s.with_memory_kind(HOST), shardings)


def is_offloaded(sharding: jax.sharding.Sharding) -> bool:
    """Whether `sharding` puts its array in host memory."""
    return getattr(sharding, "memory_kind", None) == HOST


def to_device(tree: Any, shardings: Any) -> Any:
    """Inside jit: the leaves of `tree` whose sharding is offloaded, copied to device memory."""
    return jax.tree.map(
        lambda x, s: jax.device_put(x, s.with_memory_kind(DEVICE)) if is_offloaded(s) else x,
        tree, shardings)
