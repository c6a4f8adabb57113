"""`DeviceBatchLoader`: a whole split kept on the devices, batches gathered there."""

import collections
import dataclasses
import functools
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import PyTree

from .._checks import check_int
from .._mesh_axes import data_axis
from ._batching import batch_size_of
from ._order import OrderedLoader

BATCH_AXIS = "batch"


def default_mesh() -> Mesh:
    """A 1-D mesh over every device (all processes), axis `"batch"`: the Trainer's default."""
    return Mesh(np.asarray(jax.devices()), (BATCH_AXIS,))


def check_mesh(mesh: Mesh, batch_size: int) -> None:
    """Raise unless `mesh` has a data axis (`"data"` or `"batch"`) that splits `batch_size`
    evenly."""
    if not isinstance(mesh, Mesh):
        raise TypeError(f"`mesh` must be a `jax.sharding.Mesh`, got {type(mesh).__name__}.")
    axis = data_axis(mesh)
    n = mesh.shape[axis]
    if batch_size % n != 0:
        raise ValueError(
            f"Batch size {batch_size} does not split evenly over the {n} devices of the "
            f"mesh's {axis!r} axis; use a multiple of {n} or a smaller `mesh`."
        )


def put_replicated(arrays: PyTree, mesh: Mesh) -> PyTree:
    """Upload host arrays once, a full copy on every device of `mesh`."""
    return jax.device_put(arrays, NamedSharding(mesh, PartitionSpec()))


def _gather_body(arrays, indices, b, *, sharding, transform):
    """Batch `b` of the epoch (traceable; `b` may be a traced device scalar)."""
    idx = indices[b]
    # Every index is in range by construction; promising so spares XLA the clamping, which
    # makes CPU gathers several times faster.
    batch = jax.tree.map(lambda a: a.at[idx].get(mode="promise_in_bounds"), arrays)
    if transform is not None:
        batch = transform(batch)
    return jax.lax.with_sharding_constraint(batch, sharding)


@dataclasses.dataclass(frozen=True)
class DeviceGather:
    """`gather(data, step)`: the training batch of global step `step`, gathered on the device
    from a device-resident epoch (`DeviceBatchLoader.device_epoch`).

    Traceable, so the Trainer calls it *inside* its compiled step, keyed by its on-device step
    counter: one dispatch per step, nothing uploaded per step. Hashable by value, so the same
    loader configuration never recompiles from one epoch to the next.
    """

    sharding: NamedSharding
    transform: Any

    def __call__(self, data: dict[str, Any], step: jax.Array) -> PyTree:
        b = step - data["first_step"]
        return _gather_body(
            data["arrays"],
            data["indices"],
            b,
            sharding=self.sharding,
            transform=self.transform,
        )


@functools.partial(jax.jit, static_argnums=0)
def _gather_next(gather: DeviceGather, data: dict[str, Any], step: jax.Array):
    """Batch `step` and `step + 1`, in one dispatch (the counter stays on the device)."""
    return gather(data, step), step + 1


@functools.partial(jax.jit, static_argnums=(2, 3))
def _gather_rows(arrays: PyTree, indices: jax.Array, sharding: NamedSharding, transform: Any):
    """The rows `indices` of `arrays` (a short last batch, at its own size)."""
    return _gather_body(arrays, indices[None], 0, sharding=sharding, transform=transform)


class DeviceBatchLoader(OrderedLoader):
    """Batches gathered on the devices from a split that already lives there.

    The split is uploaded once (replicated over `mesh`); each epoch uploads only its index
    order, `(num_batches, batch_size)` int32, and every batch is one compiled gather with no
    host-to-device transfer at all (even the batch counter lives on the device). The order
    is the host `BatchLoader`'s (same `(seed, epoch)` permutation, same short last batch), so
    host and device mode give identical batches; here they are `jax.Array`s of the *global*
    batch, sharded along the leading axis with `NamedSharding(mesh, PartitionSpec("batch"))`
    (or `"data"`: the mesh's data axis; each process's devices hold that process's share), which is how the Trainer places
    batches, so placing them again is free. A short last evaluation batch whose size does
    not split over the mesh is replicated instead (every device holds all of its rows).

    **Arguments:**

    - `arrays`: pytree of arrays sharing a leading axis. Host arrays are uploaded here,
      replicated over `mesh`; pass arrays already uploaded (`put_replicated`) to share one
      upload between epochs, as `ArrayDataModule` does.
    - `batch_size`: global batch size; a multiple of the size of the mesh's data axis.
    - `mesh`: the devices; `None` = every device, as the Trainer uses by default. Its data
      axis is `"data"` if it has one, else `"batch"` (copies are kept over the others).
    - `shuffle`, `seed`, `epoch`, `drop_last`: as in `BatchLoader`.
    - `transform`: optional function applied to every gathered batch inside the compiled
      gather (jax arrays in and out), e.g. `PixelDecode`. It must be hashable (functions and
      plain objects are) and is best reused across epochs, so nothing recompiles.
    - `ahead`: how many batches may be in flight (dispatched, not yet computed) before the
      loader waits for the oldest. Gathers are asynchronous; this bounds device memory and
      keeps the steps fed by the loader from queueing up without limit.

    **Example:**

    ```python
    data = put_replicated({"x": x, "y": y}, default_mesh())   # once
    for batch in DeviceBatchLoader(data, 128, shuffle=True, seed=0, epoch=2).iter_from(10):
        ...
    ```
    """

    def __init__(
        self,
        arrays: PyTree,
        batch_size: int,
        *,
        mesh: Mesh | None = None,
        shuffle: bool = False,
        seed: int = 0,
        epoch: int = 0,
        drop_last: bool = False,
        transform: Callable[[PyTree], PyTree] | None = None,
        ahead: int = 2,
    ):
        check_int("ahead", ahead, minimum=1)
        self.ahead = ahead
        self.mesh = default_mesh() if mesh is None else mesh
        check_mesh(self.mesh, batch_size)
        if not all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(arrays)):
            arrays = put_replicated(arrays, self.mesh)
        self.arrays = arrays
        self._set_order(
            batch_size_of(arrays),
            batch_size,
            drop_last=drop_last,
            shuffle=shuffle,
            seed=seed,
            epoch=epoch,
        )
        self.transform = transform
        self.data_axis = data_axis(self.mesh)
        self.sharding = NamedSharding(self.mesh, PartitionSpec(self.data_axis))

    def device_epoch(self, first_step: int) -> tuple[DeviceGather, dict[str, Any]]:
        """This epoch's full batches as `(gather, data)` for gathering inside a compiled step.

        `data` holds the split, the epoch's order (uploaded now, once) and `first_step`, the
        global step of the epoch's batch 0; `gather(data, step)` is the batch of global step
        `step`, equal to the one `iter_from` yields for it. A short last evaluation batch is
        not part of it (`iter_from` yields it).
        """
        by_batch = NamedSharding(self.mesh, PartitionSpec(None, self.data_axis))
        indices = jax.device_put(self.order.full_batches(), by_batch)
        first = jax.device_put(np.int32(first_step), NamedSharding(self.mesh, PartitionSpec()))
        gather = DeviceGather(self.sharding, self.transform)
        return gather, {"arrays": self.arrays, "indices": indices, "first_step": first}

    def _short_batch(self, b: int) -> PyTree:
        """The short last batch `b` at its own size: sharded like the others if its size
        splits over the mesh, else replicated."""
        rows = self.order.global_indices(b).astype(np.int32)
        replicated = NamedSharding(self.mesh, PartitionSpec())
        fits = len(rows) % self.mesh.shape[self.data_axis] == 0
        sharding = self.sharding if fits else replicated
        return _gather_rows(self.arrays, jax.device_put(rows, replicated), sharding, self.transform)

    def _batches(self, start: int) -> Iterator[PyTree]:
        if start >= len(self):
            return
        # The only uploads of the epoch: its order, and the step counter (kept on device).
        gather, data = self.device_epoch(first_step=0)
        full = len(data["indices"])
        b = jax.device_put(np.int32(start), NamedSharding(self.mesh, PartitionSpec()))
        pending: collections.deque = collections.deque()
        for i in range(start, len(self)):
            if i < full:
                batch, b = _gather_next(gather, data, b)
            else:
                batch = self._short_batch(i)
            # Backpressure: gathers are dispatched asynchronously, so without this the
            # loader (and the steps fed by it) could run arbitrarily far ahead of the device.
            pending.append(batch)
            if len(pending) > self.ahead:
                jax.block_until_ready(pending.popleft())
            yield batch
