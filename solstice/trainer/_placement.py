"""Device placement: the mesh, batch sharding, and replication of the experiment."""

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

PyTree = Any

BATCH_AXIS = "batch"


def resolve_devices(devices: "str | int | Sequence[jax.Device]") -> list[jax.Device]:
    """Turn the Trainer's `devices=` argument into a list of devices.

    `"auto"` means every device of the default backend (all processes' devices after
    `jax.distributed.initialize()`); an int `n` the first `n` devices of this process; a list
    is used as given.
    """
    if devices == "auto" or devices is None:
        return list(jax.devices())
    if isinstance(devices, bool) or not isinstance(devices, (int, Sequence)):
        raise TypeError(
            f"`devices` must be 'auto', a positive int or a list of jax devices, got "
            f"{devices!r}."
        )
    if isinstance(devices, int):
        available = jax.local_devices()
        if not 1 <= devices <= len(available):
            raise ValueError(
                f"`devices={devices}` but this process has {len(available)} device(s) "
                f"({available[0].platform}). Use a number from 1 to {len(available)} or "
                "'auto'. On CPU, more devices can be faked with "
                "`XLA_FLAGS=--xla_force_host_platform_device_count=N`."
            )
        if jax.process_count() > 1:
            raise ValueError(
                "`devices=<int>` is ambiguous with several processes; use 'auto' or a list."
            )
        return list(available[:devices])
    devs = list(devices)
    if not devs or not all(isinstance(d, jax.Device) for d in devs):
        raise TypeError(f"`devices` list must hold jax devices, got {devices!r}.")
    return devs


class Placement:
    """Puts batches on a 1-D `Mesh` (axis `"batch"`) and replicates the experiment.

    One device is the degenerate case of the same code. With several processes each process
    provides its share of every global batch (`jax.make_array_from_process_local_data`).

    **Example:**

    ```python
    placement = Placement("auto")
    batch = placement.put_batch({"x": np.ones((8, 3), np.float32)})
    ```
    """

    def __init__(self, devices: "str | int | Sequence[jax.Device]" = "auto"):
        self.devices = resolve_devices(devices)
        self.mesh = Mesh(np.asarray(self.devices), (BATCH_AXIS,))
        self.batch_sharding = NamedSharding(self.mesh, PartitionSpec(BATCH_AXIS))
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.multi_process = jax.process_count() > 1
        local = [d for d in self.devices if d.process_index == jax.process_index()]
        self.num_local_devices = len(local)

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    def check_local_batch_size(self, size: int) -> None:
        """Raise `ValueError` unless `size` (this process's rows) splits over its devices."""
        if size % self.num_local_devices != 0:
            raise ValueError(
                f"The batch size {size} is not divisible by the number of devices "
                f"{self.num_local_devices}: the batch axis is split evenly across devices. "
                f"Use a batch size that is a multiple of {self.num_local_devices} (for "
                f"example {size - size % self.num_local_devices or self.num_local_devices}), "
                "or pass fewer `devices=`."
            )

    def put_batch(self, batch: PyTree) -> PyTree:
        """Place a host batch on the devices, sharded along its leading axis."""
        if self.multi_process:
            return jax.tree.map(
                lambda x: jax.make_array_from_process_local_data(self.batch_sharding, x),
                batch,
            )
        return jax.device_put(batch, self.batch_sharding)

    def put_stacked_batches(self, batches: PyTree) -> PyTree:
        """Place a stack of batches `(K, batch, ...)`, sharded along axis 1."""
        sharding = NamedSharding(self.mesh, PartitionSpec(None, BATCH_AXIS))
        if self.multi_process:
            return jax.tree.map(
                lambda x: jax.make_array_from_process_local_data(sharding, x), batches
            )
        return jax.device_put(batches, sharding)

    def replicate(self, tree: PyTree) -> PyTree:
        """Copy every array of `tree` onto all devices (a full copy on each).

        Always a copy, never an alias: the Trainer donates these buffers, and the caller's
        experiment must stay usable.
        """
        if self.multi_process:
            return jax.tree.map(self._replicate_from_host, tree)
        return jax.device_put(tree, self.replicated, may_alias=False)

    def _replicate_from_host(self, x: jax.Array) -> jax.Array:
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            data = self._replicate_from_host(jax.random.key_data(x))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        host = np.asarray(jax.device_get(x))
        return jax.make_array_from_process_local_data(self.replicated, host, host.shape)
