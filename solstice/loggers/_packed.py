"""`PackedMetrics`: scalar metrics held in one device vector, read back in one transfer."""

from collections.abc import Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def packable(value: Any) -> bool:
    """Whether `value` (an array, or its `jax.ShapeDtypeStruct`) goes into the packed
    vector: a 0-d floating value of up to 32 bits (so float32 holds it exactly)."""
    dtype = getattr(value, "dtype", None)
    return (
        dtype is not None
        and getattr(value, "shape", None) == ()
        and jnp.issubdtype(dtype, jnp.floating)
        and jnp.dtype(dtype).itemsize <= 4
    )


def packed_names(metrics: Mapping[str, Any]) -> tuple[str, ...]:
    """The names `pack_scalars(metrics)` puts in its vector, in order (works on shapes)."""
    return tuple(key for key, value in metrics.items() if packable(value))


def pack_scalars(metrics: Mapping[str, Any]) -> tuple[tuple[str, ...], jax.Array | None, dict]:
    """Traced: split `metrics` into `(names, vector, rest)`.

    Every `packable` value goes into one float32 `vector` in key order (`packed_names`);
    everything else (integers, float64, arrays) is kept in `rest` as it is. Use inside a
    compiled function, so the packing costs no dispatch.
    """
    names, values, rest = [], [], {}
    for key, value in metrics.items():
        if packable(value):
            names.append(key)
            values.append(jnp.asarray(value, jnp.float32))
        else:
            rest[key] = value
    vector = jnp.stack(values) if values else None
    return tuple(names), vector, rest


class PackedMetrics(Mapping[str, Any]):
    """A read-only mapping of metric name -> 0-d value whose floating scalars live in one
    float32 device vector.

    Loggers convert it with one device-to-host copy (`host_floats()`), instead of one per
    metric. Indexing returns a 0-d device array (a slice of the vector); that costs a
    dispatch, so code that reads every value should call `host_floats()` once instead.

    **Arguments:**

    - `names`: the names of the vector's entries, in order.
    - `vector`: float32 array of shape `(len(names),)`, or `None` when empty.
    - `rest`: other values (integers, Python numbers), kept as they are.
    - `prefix`: prepended to every name (e.g. `"train/"`).

    **Example:**

    ```python
    layout = {}

    @jax.jit
    def close(metrics):                  # inside a compiled step: names are trace-time data
        layout["names"], vector, rest = pack_scalars(metrics)
        return vector, rest

    vector, rest = close(metrics)
    packed = PackedMetrics(layout["names"], vector, rest, prefix="train/")
    packed.host_floats()   # {"train/loss": 0.25, ...}: one transfer
    ```
    """

    __slots__ = ("_index", "_rest", "names", "vector")

    def __init__(
        self,
        names: tuple[str, ...],
        vector: jax.Array | None,
        rest: Mapping[str, Any] | None = None,
        prefix: str = "",
    ):
        self.names = tuple(prefix + name for name in names)
        self.vector = vector
        self._rest = {prefix + k: v for k, v in (rest or {}).items()}
        self._index = {name: i for i, name in enumerate(self.names)}

    def with_values(self, vector: jax.Array | None, rest: Mapping[str, Any]) -> "PackedMetrics":
        """A mapping with the same (prefixed) names and new values, built without redoing
        the names (`rest` keys are taken as already prefixed)."""
        new = PackedMetrics.__new__(PackedMetrics)
        new.names, new._index = self.names, self._index
        new.vector, new._rest = vector, dict(rest)
        return new

    def with_items(self, **extra: Any) -> "PackedMetrics":
        """A copy with `extra` host values added (e.g. `epoch=3`)."""
        new = PackedMetrics.__new__(PackedMetrics)
        new.names, new.vector, new._index = self.names, self.vector, self._index
        new._rest = {**self._rest, **extra}
        return new

    @property
    def rest(self) -> Mapping[str, Any]:
        """The values that are not in the vector (integers, Python numbers, ...), by name."""
        return self._rest

    def __getitem__(self, key: str) -> Any:
        i = self._index.get(key)
        if i is not None and self.vector is not None:
            return self.vector[i]
        return self._rest[key]

    def __iter__(self) -> Iterator[str]:
        yield from self.names
        yield from self._rest

    def __len__(self) -> int:
        return len(self.names) + len(self._rest)

    def __contains__(self, key: object) -> bool:
        return key in self._index or key in self._rest

    def host_floats(self) -> dict[str, float]:
        """Every value as a Python float, with one copy of the vector to the host (this waits
        for the device: call it off the training thread)."""
        out: dict[str, float] = {}
        if self.names:
            out.update(zip(self.names, np.asarray(self.vector).tolist()))
        arrays = {k: v for k, v in self._rest.items() if isinstance(v, jax.Array)}
        if arrays:
            arrays = dict(zip(arrays, jax.device_get(list(arrays.values()))))
        for key, value in self._rest.items():
            out[key] = float(arrays.get(key, value))
        return out

    def __repr__(self) -> str:
        return f"PackedMetrics({list(self)})"
