"""Named device meshes with the three axes every ravine model is laid out on."""
from collections.abc import Mapping, Sequence

import jax
from jax.sharding import AxisType

DATA, STAGE, FSDP, TENSOR = "data", "stage", "fsdp", "tensor"
# Outermost first: data-parallel replicas talk least, tensor-parallel shards talk most, so
# tensor is the fastest-varying axis and lands on neighbouring devices (same host / ICI ring).
# Pipeline stages only pass one activation per tick to a neighbour: next to data.
AXES = (DATA, STAGE, FSDP, TENSOR)


def parse_mesh_spec(spec: str | Mapping[str, int]) -> dict[str, int]:
    """Parses `"data=2,fsdp=1,tensor=4"` (or a mapping) into `{axis: size}` over `AXES`.

    Missing axes get size 1; at most one size may be -1 (resolved by `make_mesh`).
    Raises ValueError naming an unknown axis, a repeated axis, or a bad size.

    Example:
      >>> from ravine.sharding import parse_mesh_spec
      >>> parse_mesh_spec("data=2,tensor=-1")
      {'data': 2, 'stage': 1, 'fsdp': 1, 'tensor': -1}
    """
    if isinstance(spec, Mapping):
        items = list(spec.items())
    elif isinstance(spec, str):
        items = []
        for part in filter(None, (p.strip() for p in spec.split(","))):
            name, sep, size = part.partition("=")
            if not sep:
                raise ValueError(f"mesh spec entry {part!r} is not of the form axis=size")
            try:
                items.append((name.strip(), int(size)))
            except ValueError:
                raise ValueError(f"mesh axis {name.strip()!r} has size {size.strip()!r}, "
                                 "which is not an integer") from None
    else:
        raise ValueError(f"mesh spec must be a string like 'data=2,tensor=4' or a mapping, "
                         f"got {spec!r}")
    sizes = dict.fromkeys(AXES, 1)
    seen = set()
    for name, size in items:
        if name not in sizes:
            raise ValueError(f"unknown mesh axis {name!r}; the axes are {', '.join(AXES)}")
        if name in seen:
            raise ValueError(f"mesh axis {name!r} is given twice")
        if not isinstance(size, int) or isinstance(size, bool) or (size < 1 and size != -1):
            raise ValueError(f"mesh axis {name!r} has size {size!r}; sizes are positive "
                             "integers or -1 (the rest of the devices)")
        seen.add(name)
        sizes[name] = size
    wildcards = [name for name, size in sizes.items() if size == -1]
    if len(wildcards) > 1:
        raise ValueError(f"only one mesh axis may be -1, got {', '.join(wildcards)}")
    return sizes


def make_mesh(spec: str | Mapping[str, int],
              devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
    """Builds a `jax.sharding.Mesh` with axes ("data", "stage", "fsdp", "tensor"), all Auto.

    Args:
      spec: `"data=2,fsdp=1,tensor=4"` (`"stage=4,data=2"` for a pipeline) or a mapping
        `{"data": 2, "tensor": 4}`. Missing axes have size 1; one axis may be -1 and takes
        all remaining devices.
      devices: the devices to lay out (default: `jax.devices()`, every process's devices).

    Auto axes let GSPMD propagate shardings from the named in/out shardings and flax's
    logical constraints (jax's newer default, Explicit, breaks linen logical partitioning).
    Raises ValueError when the sizes' product does not equal the number of devices,
    stating both numbers.

    Example:
      >>> import jax
      >>> from ravine.sharding import make_mesh
      >>> mesh = make_mesh("data=-1", devices=jax.devices()[:1])
      >>> mesh.axis_names, dict(mesh.shape)
      (('data', 'stage', 'fsdp', 'tensor'), {'data': 1, 'stage': 1, 'fsdp': 1, 'tensor': 1})
    """
    sizes = parse_mesh_spec(spec)
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    known = 1
    for size in sizes.values():
        known *= size if size != -1 else 1
    for name, size in sizes.items():
        if size == -1:
            if n % known:
                raise ValueError(f"mesh {_format(sizes)} cannot fill {n} devices: the fixed "
                                 f"axes' product {known} does not divide {n}")
            sizes[name] = n // known
            known = n
    if known != n:
        raise ValueError(f"mesh {_format(sizes)} has {known} devices (product of its sizes) "
                         f"but {n} devices are available")
    shape = tuple(sizes[a] for a in AXES)
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def _format(sizes):
    return ",".join(f"{name}={size}" for name, size in sizes.items())
