"""The Trainer's device mesh: `devices=` and `mesh=` turned into one `jax.sharding.Mesh`.

Without `mesh=` the mesh has one axis, `"batch"`, over the `devices=` (as it always had). A
dict of axis sizes (`{"data": 2, "model": 2}`) is laid over those devices so that every axis
but the data axis varies fastest: each process's devices then hold whole slices of the data
axis (a model axis stays within a process, where its collectives are cheapest), and process
`p` holds the `p`-th block of it, which is the share of every batch that it reads. An
explicit `Mesh` brings its own devices and layout, which are checked the same way.
"""

import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from .._mesh_axes import data_axis

BATCH_AXIS = "batch"


def resolve_devices(devices: "str | int | Sequence[jax.Device]") -> list[jax.Device]:
    """Turn the Trainer's `devices=` argument into a list of devices.

    `"auto"` means every device of the default backend (all processes' devices after
    `jax.distributed.initialize()`); an int `n` the first `n` devices of this process; a list
    is used as given.
    """
    if devices == "auto" or devices is None:
        return list(jax.devices())
    if (
        isinstance(devices, bool)
        or not isinstance(devices, (int, Sequence))
        or isinstance(devices, str)
    ):
        raise TypeError(
            f"`devices` must be 'auto', a positive int or a list of jax devices, got {devices!r}."
        )
    if isinstance(devices, int):
        available = jax.local_devices()
        if jax.process_count() > 1:
            raise ValueError(
                f"`devices={devices}` is ambiguous with {jax.process_count()} processes: "
                "every process must use the same global mesh. Use `devices='auto'` (every "
                "device of every process) or pass the same list of devices in every process."
            )
        if not 1 <= devices <= len(available):
            raise ValueError(
                f"`devices={devices}` but this process has {len(available)} device(s) "
                f"({available[0].platform}). Use a number from 1 to {len(available)} or "
                "'auto'. On CPU, more devices can be faked with "
                "`XLA_FLAGS=--xla_force_host_platform_device_count=N`."
            )
        return list(available[:devices])
    devs = list(devices)
    if not devs or not all(isinstance(d, jax.Device) for d in devs):
        raise TypeError(f"`devices` list must hold jax devices, got {devices!r}.")
    if len(set(devs)) != len(devs):
        raise ValueError(f"`devices` lists a device more than once: {devs!r}.")
    if not any(d.process_index == jax.process_index() for d in devs):
        raise ValueError(
            f"None of `devices` belongs to this process (process {jax.process_index()}); "
            "every process must take part in the mesh. Use `devices='auto'`."
        )
    return devs


def build_mesh(
    devices: "str | int | Sequence[jax.Device]", mesh: "Mapping[str, int] | Mesh | None"
) -> Mesh:
    """The Trainer's mesh from its `devices=` and `mesh=` arguments (see `Trainer`).

    **Arguments:**

    - `devices`: as `resolve_devices` takes it.
    - `mesh`: `None` (a 1-D mesh, axis `"batch"`, over `devices`), a dict of axis name ->
      size (at most one size `-1`: the devices left), or a `jax.sharding.Mesh`.

    **Returns:** a `Mesh` with a data axis (`solstice._mesh_axes.data_axis`) whose slices
    each lie within one process, process `p` holding the `p`-th block of them.
    """
    if mesh is None:
        return Mesh(np.asarray(resolve_devices(devices)), (BATCH_AXIS,))
    if isinstance(mesh, Mesh):
        if not (devices == "auto" or devices is None):
            chosen = resolve_devices(devices)
            if set(chosen) != set(mesh.devices.flat):
                raise ValueError(
                    f"`devices` names devices {sorted(d.id for d in chosen)} but `mesh` is "
                    f"over devices {sorted(d.id for d in mesh.devices.flat)}. An explicit "
                    "`Mesh` brings its own devices: leave `devices` out, or build the mesh "
                    "over the same devices."
                )
        _check_layout(mesh, data_axis(mesh))
        return mesh
    if not isinstance(mesh, Mapping):
        raise TypeError(
            f"`mesh` must be a dict of axis name -> size (e.g. `{{'data': 2, 'model': 2}}`) "
            f"or a `jax.sharding.Mesh`, got {type(mesh).__name__} {mesh!r}."
        )
    devs = sorted(resolve_devices(devices), key=lambda d: (d.process_index, d.id))
    sizes = _axis_sizes(mesh, len(devs))
    names = tuple(sizes)
    data = data_axis(names)
    # The data axis first and the others fastest over the (process-ordered) devices, then
    # the axes put back in the order the dict gives them.
    order = (data, *(n for n in names if n != data))
    grid = np.asarray(devs, object).reshape([sizes[n] for n in order])
    built = Mesh(np.transpose(grid, [order.index(n) for n in names]), names)
    _check_layout(built, data)
    return built


def _axis_sizes(mesh: Mapping[Any, Any], num_devices: int) -> dict[str, int]:
    """The dict `mesh` checked, with its `-1` resolved to the devices left."""
    for name, size in mesh.items():
        if not isinstance(name, str) or isinstance(size, bool) or not isinstance(size, int):
            raise TypeError(
                f"`mesh` maps axis names (str) to sizes (int), got {name!r}: {size!r}. "
                "For example `mesh={'data': 2, 'model': 2}`."
            )
        if size < 1 and size != -1:
            raise ValueError(
                f"`mesh` gives axis {name!r} size {size}; sizes are positive (or -1 for "
                "one axis: the devices left)."
            )
    rest = [name for name, size in mesh.items() if size == -1]
    known = math.prod(size for size in mesh.values() if size != -1)
    if len(rest) > 1:
        raise ValueError(f"`mesh={dict(mesh)}` has several axes of size -1; at most one.")
    sizes = dict(mesh)
    if rest and num_devices % known == 0:
        sizes[rest[0]] = num_devices // known
    if not mesh or math.prod(sizes.values()) != num_devices:
        raise ValueError(
            f"`mesh={dict(mesh)}` needs {known if not rest else f'a multiple of {known}'} "
            f"devices, but the Trainer uses {num_devices}. Make the sizes multiply to "
            f"{num_devices}, give one axis size -1 (the devices left), or choose `devices=`."
        )
    return sizes


def _check_layout(mesh: Mesh, data: str) -> None:
    """Raise unless every slice of the data axis lies within one process and process `p`
    holds the `p`-th block of them (how each process's share of a batch is placed)."""
    grid = np.moveaxis(mesh.devices, list(mesh.axis_names).index(data), 0)
    owners = [{d.process_index for d in row} for row in grid.reshape(len(grid), -1)]
    if any(len(o) > 1 for o in owners):
        spread = next(sorted(o) for o in owners if len(o) > 1)
        raise ValueError(
            f"The mesh {dict(mesh.shape)} spreads one slice of its data axis {data!r} over "
            f"processes {spread}: the other axes must stay within a process, which reads "
            "its own share of every batch. Make them no larger than the devices of one "
            f"process ({jax.local_device_count()}), or order the mesh's devices by process."
        )
    flat = [next(iter(o)) for o in owners]
    shares = {flat.count(p) for p in flat}
    if flat != sorted(flat) or len(shares) > 1:
        raise ValueError(
            f"The mesh {dict(mesh.shape)} gives the slices of its data axis {data!r} to "
            f"processes {flat}; process p must hold the p-th block of them (its share of "
            "every batch), all blocks of one size. Order the mesh's devices by `process_index`."
        )
