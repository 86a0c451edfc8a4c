"""Global batches from per-process data, split over the data-parallel axes."""
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from ravine.sharding.mesh import DATA, FSDP

BATCH_AXES = (DATA, FSDP)


def batch_sharding(mesh: jax.sharding.Mesh, batch_dim: int = 0) -> NamedSharding:
    """`NamedSharding` splitting dimension `batch_dim` over ("data", "fsdp").

    `batch_dim=1` suits a batch stacked as [micro_steps, micro_batch, ...] for gradient
    accumulation: each micro-batch is then spread over every data-parallel device.
    """
    return NamedSharding(mesh, PartitionSpec(*([None] * batch_dim), BATCH_AXES))


def shard_batch(local_batch: Any, mesh: jax.sharding.Mesh, batch_dim: int = 0) -> Any:
    """Builds global `jax.Array`s from this process's slice of the batch.

    Args:
      local_batch: a pytree of host arrays; dimension `batch_dim` holds this process's share
        of the global batch (the whole batch when there is one process).
      mesh: the training mesh.
      batch_dim: which dimension is the batch (see `batch_sharding`).

    Returns:
      The same pytree of global arrays, sharded with `batch_sharding(mesh, batch_dim)`; its
      batch dimension is the sum of the processes' shares
      (`jax.make_array_from_process_local_data`). Works unchanged with one process.
    """
    sharding = batch_sharding(mesh, batch_dim)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)
