"""The collectives of a compiled program and the bytes they move, read from its HLO text.

`jax.jit(f).lower(*args).compile().as_text()` is the optimized, partitioned HLO module that
runs on each device: every collective the partitioner (GSPMD, `shard_map`) inserted is
there with its result shape and its device groups. `collectives(hlo_text)` lists them,
each with how many times one run of the program executes it (a collective inside a
`while` body runs once per trip: pipeline ticks, gradient-accumulation and scan loops) and
the bytes it moves per device under the bandwidth-optimal ring algorithms:

    op                   operand bytes B (one device's)     bytes each device sends
    all-reduce           B                                  2 (N - 1) / N * B
    all-gather           B = result / N                     (N - 1) / N * result
    reduce-scatter       B = N * result                     (N - 1) / N * B
    all-to-all           B                                  (N - 1) / N * B
    collective-permute   B                                  B

(N: devices in the collective's group; Thakur, Rabenseifner & Gropp 2005, "Optimization
of Collective Communication Operations in MPICH"; Patarasuk & Yuan 2009). These are the
volumes the communication formulas of `sharding.accounting` count (ZeRO's "2 Psi" for
data parallelism is the all-reduce line with B = Psi gradient bytes).

Example::

    compiled = jax.jit(step).lower(state, batch).compile()
    for c in sharding.hlo.collectives(compiled.as_text()):
        print(c.op, c.shapes, c.group_size, c.count, c.sent_bytes)
    sharding.hlo.sent_bytes(compiled.as_text())          # per device, one run

Reading text is deliberate: it is the one stable, public view of the partitioned program
(`Compiled.as_text()`); jax has no Python API for the optimized module's instructions.
"""
import dataclasses
import math
import re
from collections.abc import Iterable

OPS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")

# Bytes per element of HLO's primitive types (xla/primitive_util.h).
DTYPE_BYTES = {
    "pred": 1, "s2": 1, "u2": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1,
    "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3": 1, "f8e4m3fnuz": 1, "f8e5m2fnuz": 1,
    "f8e4m3b11fnuz": 1, "f8e3m4": 1, "f8e8m0fnu": 1, "f4e2m1fn": 1,
    "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
    "s32": 4, "u32": 4, "f32": 4,
    "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
}

_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.*?)\s+(" + "|".join(OPS) + r")(-start)?\(")
_SHAPE = re.compile(r"\b([a-z]\w*)\[([\d,]*)\]")
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_CALLEE = re.compile(r"\b(body|condition|calls|to_apply|true_computation|false_computation)"
                     r"=%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


@dataclasses.dataclass(frozen=True)
class Collective:
    """One collective instruction of a compiled HLO module.

    Attributes:
      name: the instruction's name, e.g. "all-reduce.3".
      op: one of `OPS`.
      shapes: its result's arrays as `(dtype, dims)` pairs (several for a combined
        collective, whose result is a tuple).
      group_size: N, the devices in each of its groups (for collective-permute: 2, a
        sender and a receiver).
      count: how many times one run of the program executes it (the product of the trip
        counts of the `while` loops around it); None when a loop's trip count is unknown.
      computation: the HLO computation that holds it.
    """
    name: str
    op: str
    shapes: tuple[tuple[str, tuple[int, ...]], ...]
    group_size: int
    count: int | None
    computation: str

    @property
    def result_bytes(self) -> int:
        """Bytes of the result on one device (summed over a tuple's arrays)."""
        return sum(DTYPE_BYTES[dtype] * math.prod(dims) for dtype, dims in self.shapes)

    @property
    def operand_bytes(self) -> int:
        """Bytes of the operand on one device: the buffer being reduced / gathered / sent."""
        if self.op == "all-gather":
            return self.result_bytes // self.group_size
        if self.op == "reduce-scatter":
            return self.result_bytes * self.group_size
        return self.result_bytes

    @property
    def sent_bytes(self) -> float:
        """Bytes each device sends in one execution, ring algorithms (module docstring)."""
        n = self.group_size
        if self.op == "collective-permute":
            return float(self.result_bytes)
        if n <= 1:
            return 0.0
        if self.op == "all-reduce":
            return 2 * (n - 1) / n * self.result_bytes
        if self.op == "all-gather":
            return (n - 1) / n * self.result_bytes
        return (n - 1) / n * self.operand_bytes   # reduce-scatter, all-to-all


def _group_size(attributes: str, op: str) -> int:
    """N from `replica_groups=` in any of HLO's three spellings (or 2 for a permute)."""
    if op == "collective-permute":
        return 2
    m = re.search(r"replica_groups=\[(\d+),(\d+)\]<=", attributes)          # iota: [G,N]<=[..]
    if m:
        return int(m.group(2))
    # mesh axes: mesh['a'=2,'b'=4][, device_ids=(...)] {'b'}
    m = re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", attributes)
    if m:
        sizes = dict(re.findall(r"'(\w+)'=(\d+)", m.group(1)))
        return math.prod(int(sizes[axis]) for axis in re.findall(r"'(\w+)'", m.group(2)))
    m = re.search(r"replica_groups=\{\{([\d,]*)\}", attributes)              # explicit lists
    if m:
        return len([d for d in m.group(1).split(",") if d])
    raise ValueError(f"cannot read the device groups of a {op}: {attributes[:200]!r}")


def _computations(hlo_text: str):
    """{computation name: its lines}, and the name of the ENTRY computation."""
    computations, entry, current = {}, None, None
    for line in hlo_text.splitlines():
        if current is None:
            m = _COMPUTATION.match(line)
            if m and not line.startswith(("HloModule", " ")):
                current = m.group(1)
                computations[current] = []
                if line.startswith("ENTRY"):
                    entry = current
        elif line.startswith("}"):
            current = None
        else:
            computations[current].append(line)
    if entry is None:
        raise ValueError("no ENTRY computation: pass the text of a whole HLO module "
                         "(`compiled.as_text()`)")
    return computations, entry


def _execution_counts(computations, entry):
    """{computation: times it runs per run of `entry`}; None where a loop count is unknown."""
    calls = {name: [] for name in computations}   # caller -> [(callee, multiplier)]
    for name, lines in computations.items():
        for line in lines:
            trips = _TRIP_COUNT.search(line)
            for kind, callee in _CALLEE.findall(line):
                if kind == "body":
                    multiplier = int(trips.group(1)) if trips else None
                elif kind == "condition":
                    multiplier = int(trips.group(1)) + 1 if trips else None
                else:
                    multiplier = 1
                calls[name].append((callee, multiplier))
            for branches in _BRANCHES.findall(line):
                calls[name] += [(b.strip().lstrip("%"), 1) for b in branches.split(",")]
    counts = {}

    def visit(name, count):   # HLO's call graph is a DAG: sum over every call path
        counts[name] = None if count is None or counts.get(name, 0) is None else (
            counts.get(name, 0) + count)
        for callee, multiplier in calls.get(name, ()):
            visit(callee, None if count is None or multiplier is None else count * multiplier)

    visit(entry, 1)
    return counts


def collectives(hlo_text: str) -> list[Collective]:
    """Every collective of a compiled HLO module, in program text order.

    Args:
      hlo_text: `compiled.as_text()` of a `jax.stages.Compiled` (the optimized module; the
        pre-optimization `lowered.as_text()` holds no collectives under GSPMD).

    Returns:
      A list of `Collective`. Async pairs (`all-gather-start` / `-done`) count once, at
      their start. Collectives in computations the entry never calls are left out.
    """
    computations, entry = _computations(hlo_text)
    counts = _execution_counts(computations, entry)
    found = []
    for computation, lines in computations.items():
        if computation not in counts:
            continue
        for line in lines:
            m = _INSTRUCTION.match(line)
            if not m:
                continue
            name, result_type, op, _ = m.groups()
            shapes = tuple((dtype, tuple(int(d) for d in dims.split(",") if d))
                           for dtype, dims in _SHAPE.findall(result_type)
                           if dtype in DTYPE_BYTES)
            if op in ("all-gather", "collective-permute") and m.group(4):
                # an async start's result is (operand, result[, contexts]): keep the result
                shapes = shapes[1:2]
            found.append(Collective(name=name, op=op, shapes=shapes,
                                    group_size=_group_size(line[m.end():], op),
                                    count=counts[computation], computation=computation))
    return found


def sent_bytes(hlo_text_or_collectives: str | Iterable[Collective], op: str | None = None,
               min_bytes: int = 0) -> float:
    """Bytes one device sends in one run of the program, summed over its collectives.

    Args:
      hlo_text_or_collectives: `compiled.as_text()`, or `collectives(...)` of it.
      op: only this kind of collective (one of `OPS`); None: all.
      min_bytes: leave out collectives whose result is smaller (e.g. 64 drops the scalar
        all-reduces of a loss or of a loop's "any left?" test).

    Returns:
      sum of `count * sent_bytes`.

    Raises:
      ValueError: where a collective sits in a loop with an unknown trip count.
    """
    found = (collectives(hlo_text_or_collectives) if isinstance(hlo_text_or_collectives, str)
             else hlo_text_or_collectives)
    total = 0.0
    for c in found:
        if (op is None or c.op == op) and c.result_bytes >= min_bytes:
            if c.count is None:
                raise ValueError(f"{c.name} runs in a loop of unknown trip count")
            total += c.count * c.sent_bytes
    return total
