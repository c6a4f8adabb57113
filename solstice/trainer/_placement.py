"""Device placement: the mesh, batch sharding, and replication of the experiment.

One code path serves one device, several local devices and several processes: batches are
split over the mesh's data axis (`"batch"`, the one axis of the default mesh, or `"data"` of
a mesh with more axes, such as `{"data": 2, "model": 2}`) and copied over its other axes.
With several processes (`jax.process_count() > 1`, after `jax.distributed.initialize()`)
each process holds only its own devices' shards, so nothing here may `jax.device_put` a
process-local `jax.Array` onto the global mesh: host values are assembled with
`jax.make_array_from_process_local_data`, and global arrays are resharded by a compiled
identity that every process runs.
"""

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import PyTree

from .._mesh_axes import data_axis
from ._mesh import BATCH_AXIS as BATCH_AXIS
from ._mesh import build_mesh
from ._mesh import resolve_devices as resolve_devices


def is_device_batch(batch: PyTree) -> bool:
    """Whether every leaf of `batch` is a `jax.Array` (a device-resident loader's batch)."""
    return all(isinstance(x, jax.Array) for x in jax.tree.leaves(batch))


def _already_placed(tree: PyTree, sharding: NamedSharding) -> bool:
    """Whether every leaf is a `jax.Array` laid out exactly as `sharding` (a cheap check)."""
    leaves = jax.tree.leaves(tree)
    return bool(leaves) and all(
        isinstance(x, jax.Array)
        and (x.sharding == sharding or x.sharding.is_equivalent_to(sharding, x.ndim))
        for x in leaves
    )


def _is_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _fresh_copy(x: Any) -> Any:
    """A new buffer with `x`'s value (numpy arrays are copied by `device_put` anyway)."""
    return jnp.copy(x) if isinstance(x, jax.Array) else x


class Placement:
    """Puts batches on the Trainer's `Mesh`, split over its data axis, and places the
    experiment (replicated, or split by sharding rules).

    One device is the degenerate case of the same code. With several processes each process
    provides its share of every global batch (`jax.make_array_from_process_local_data`), and
    the experiment, identical in every process, is assembled into one global replicated array
    per leaf.

    **Arguments:**

    - `devices`: `"auto"`, an int or a list of devices (see `Trainer(devices=...)`).
    - `mesh`: `None` (a 1-D mesh, axis `"batch"`), a dict of axis sizes or a `Mesh` (see
      `Trainer(mesh=...)`).

    **Example:**

    ```python
    placement = Placement("auto")
    batch = placement.put_batch({"x": np.ones((8, 3), np.float32)})
    params = placement.replicate(params)
    ```
    """

    def __init__(
        self,
        devices: "str | int | Sequence[jax.Device]" = "auto",
        mesh: "Mapping[str, int] | Mesh | None" = None,
    ):
        self.mesh = build_mesh(devices, mesh)
        self.devices: list[jax.Device] = list(self.mesh.devices.flat)
        #: The mesh axis batches are split over (copied over the others).
        self.data_axis = data_axis(self.mesh)
        self.batch_sharding = NamedSharding(self.mesh, PartitionSpec(self.data_axis))
        self.stacked_batch_sharding = NamedSharding(self.mesh, PartitionSpec(None, self.data_axis))
        self.replicated = NamedSharding(self.mesh, PartitionSpec())
        self.process_count = len({d.process_index for d in self.devices})
        self.multi_process = self.process_count > 1
        # The CPU backend shares suitably aligned host buffers instead of copying them.
        self.on_cpu = all(d.platform == "cpu" for d in self.devices)
        self._index_scalars: list[jax.Array] = []  # see index_scalars
        #: How many ways the whole batch is split (the size of the data axis).
        self.data_shards: int = self.mesh.shape[self.data_axis]
        axis = list(self.mesh.axis_names).index(self.data_axis)
        mine = {
            index[axis]
            for index, d in np.ndenumerate(self.mesh.devices)
            if d.process_index == jax.process_index()
        }
        #: How many ways this process's rows of a batch are split (its data-axis slices).
        self.local_data_shards: int = len(mine)

    @property
    def num_devices(self) -> int:
        return len(self.devices)

    def check_local_batch_size(self, size: int) -> None:
        """Raise `ValueError` unless `size` (this process's rows) splits over its slices of
        the data axis."""
        n = self.local_data_shards
        if size % n != 0:
            axes = "" if len(self.mesh.axis_names) == 1 else f" of the {self.data_axis!r} axis"
            raise ValueError(
                f"The batch size {size} is not divisible by the number of devices {n}{axes}: "
                "the batch axis is split evenly across them. Use a batch size that is a "
                f"multiple of {n} (for example {size - size % n or n}), or pass fewer "
                "`devices=` (or a smaller data axis in `mesh=`)."
            )

    # ------------------------------------------------------------------ batches
    def put_batch(self, batch: PyTree, *, owned: bool = False) -> PyTree:
        """Place a batch on the devices, sharded along its leading axis.

        Host arrays are this process's rows of the global batch; `jax.Array`s already laid
        out on the mesh (from an on-device DataModule) are kept as they are. `owned`: the
        host arrays are copies of our own (`owned_copy`), never written again.
        """
        return self._put_sharded(batch, self.batch_sharding, owned=owned)

    def put_stacked_batches(self, batches: PyTree, *, owned: bool = False) -> PyTree:
        """Place a stack of batches `(K, batch, ...)`, sharded along axis 1.

        `owned`: the host arrays are buffers of our own from `aligned_empty`, never written
        again (not copied first on the CPU backend)."""
        return self._put_sharded(batches, self.stacked_batch_sharding, owned=owned)

    def put_rows(self, batch: PyTree, *, owned: bool = False) -> PyTree:
        """Place a batch of any size (a short last evaluation batch, one process): sharded
        along its leading axis when its rows split over the devices, else replicated (every
        device holds all of it). `owned`: as in `put_batch`."""
        rows = jax.tree.leaves(batch)[0].shape[0]
        fits = rows % self.local_data_shards == 0
        sharding = self.batch_sharding if fits else self.replicated
        return self._put_sharded(batch, sharding, owned=owned)

    def take_rows(self, batch: PyTree, positions: np.ndarray) -> PyTree:
        """The rows `positions` of a global batch on the mesh, as a new batch (sharded when
        they split over the devices, else replicated). With several processes every process
        must call this with the same positions (a compiled program over the whole mesh)."""
        fits = len(positions) % self.data_shards == 0
        index = self._put_global(np.asarray(positions, np.int32), self.replicated)
        return _take_rows(batch, index, self.batch_sharding if fits else self.replicated)

    def index_scalars(self, n: int) -> list[jax.Array]:
        """Replicated int32 device scalars `0 .. n-1`, made once (indices into uploaded
        chunks of batches: passing a cached scalar costs no transfer)."""
        if len(self._index_scalars) < n:
            self._index_scalars = [jax.device_put(np.int32(i), self.replicated) for i in range(n)]
        return self._index_scalars[:n]

    def _put_sharded(self, tree: PyTree, sharding: NamedSharding, owned: bool = False) -> PyTree:
        if _already_placed(tree, sharding):
            return tree  # an on-device DataModule's batch: `device_put` would cost ~30 us
        if not self.multi_process:
            if self.on_cpu and not owned:
                tree = jax.tree.map(_owned_host_copy, tree)
            return jax.device_put(tree, sharding)
        return jax.tree.map(lambda x: self._put_global(x, sharding, local_rows=True), tree)

    # ------------------------------------------------------------------ experiment
    def replicate(self, tree: PyTree, *, copy: bool = True) -> PyTree:
        """Put every array of `tree` on all devices (a full copy on each).

        **Arguments:**

        - `tree`: a pytree of arrays (numpy, or `jax.Array`s on any devices), with the same
          values in every process.
        - `copy`: `True` (the default) always makes new buffers, never aliases: the Trainer
          donates them, and the caller's experiment must stay usable. `False` keeps leaves
          that are already replicated on this mesh as they are (for an experiment that a
          hook returned, whose arrays are mostly the Trainer's own).

        **Returns:** the same pytree, every array a `jax.Array` with sharding `replicated`.
        """
        return self.shard(tree, self.replicated, copy=copy)

    def shard(self, tree: PyTree, shardings: PyTree, *, copy: bool = True) -> PyTree:
        """Put the arrays of `tree` on the mesh with the given shardings.

        **Arguments:**

        - `tree`: a pytree of arrays whose values are the same in every process.
        - `shardings`: one `NamedSharding` for all leaves, or a pytree of them (see
          `_sharding_rules.experiment_shardings`).
        - `copy`: as in `replicate`.
        """
        if not self.multi_process:
            if copy:
                # `may_alias=False` is not enough: on several devices jax 0.10 reuses the
                # source buffer as device 0's copy, which the Trainer would then donate.
                tree = jax.tree.map(_fresh_copy, tree)
            return jax.device_put(tree, shardings)
        if isinstance(shardings, NamedSharding):
            return jax.tree.map(lambda x: self._put_global(x, shardings, copy=copy), tree)
        return jax.tree.map(lambda x, s: self._put_global(x, s, copy=copy), tree, shardings)

    def to_host(self, tree: PyTree) -> PyTree:
        """Copy every array of `tree` to this process's host memory, whole (numpy arrays).

        With one process this is `jax.device_get`. With several, an array sharded over other
        processes' devices is gathered from all of them (a collective: every process must
        call this with the same tree), and a replicated one is read from a local copy.
        """
        if not self.multi_process:
            return jax.device_get(tree)
        from jax.experimental import multihost_utils

        def fetch(x: Any) -> Any:
            if not isinstance(x, jax.Array) or x.is_fully_addressable:
                return jax.device_get(x)
            if x.is_fully_replicated:
                return np.asarray(x.addressable_data(0))
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))

        return jax.tree.map(fetch, tree)

    def _put_global(
        self,
        x: Any,
        sharding: NamedSharding,
        *,
        local_rows: bool = False,
        copy: bool = False,
    ) -> jax.Array:
        """One leaf onto a sharding that spans several processes.

        `local_rows`: a host value holds only this process's rows of the leading sharded
        axis (batches); otherwise it is the whole value, the same in every process.
        """
        if _is_key(x):
            data = self._put_global(
                jax.random.key_data(x), sharding, local_rows=local_rows, copy=copy
            )
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            # Already global: keep it, or reshard it with a compiled identity that every
            # process runs (a collective; `device_put` cannot cross processes).
            if not copy and x.sharding.is_equivalent_to(sharding, x.ndim):
                return x
            return jax.jit(_identity, out_shardings=sharding)(x)
        host = np.asarray(jax.device_get(x))
        if local_rows:
            return jax.make_array_from_process_local_data(sharding, host)
        return jax.make_array_from_process_local_data(sharding, host, host.shape)


def aligned_empty(shape: tuple[int, ...], dtype: Any) -> np.ndarray:
    """A fresh uninitialised host array whose data is 64-byte aligned.

    On the CPU backend `jax.device_put` uses such a buffer in place instead of copying it
    (a 4 MB batch: ~40 us against ~800 us), so only fill it with data that is never written
    again.
    """
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(nbytes + 64, np.uint8)
    offset = (-raw.ctypes.data) % 64
    return raw[offset : offset + nbytes].view(dtype).reshape(shape)


def owned_copy(batch: PyTree) -> PyTree:
    """`batch` with every host array copied into a buffer of our own (see `aligned_empty`):
    a loader may then reuse its buffers for the next batch, and on the CPU backend
    `put_batch(..., owned=True)` uses the copies in place. Device arrays pass as they are."""
    return jax.tree.map(_owned_host_copy, batch)


def _owned_host_copy(x: Any) -> Any:
    """A host array copied into a buffer of our own (aligned, see `aligned_empty`), so that
    `device_put` on the CPU backend neither copies it again nor aliases the caller's buffer
    (a loader may reuse it for the next batch)."""
    if type(x) is not np.ndarray:
        return x
    out = aligned_empty(x.shape, x.dtype)
    np.copyto(out, x)
    return out


@functools.partial(jax.jit, static_argnums=2)
def _take_rows(tree: PyTree, positions: jax.Array, sharding: NamedSharding) -> PyTree:
    taken = jax.tree.map(lambda x: jnp.take(x, positions, axis=0), tree)
    return jax.lax.with_sharding_constraint(taken, sharding)


def _identity(x: jax.Array) -> jax.Array:
    return x.copy()
