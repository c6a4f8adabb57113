"""The data axis of a device mesh: the one mesh axis that batches are split over.

Defined once, here, for the Trainer's placement and for the on-device DataModules alike: a
mesh's data axis is `"data"` if it has one, else `"batch"` (the name of the Trainer's 1-D
default mesh). Every other axis (e.g. `"model"`) holds a copy of each batch.
"""

from collections.abc import Iterable

from jax.sharding import Mesh

#: The names a data axis may have, in order of preference.
DATA_AXES = ("data", "batch")


def data_axis(mesh: "Mesh | Iterable[str]") -> str:
    """The name of the axis of `mesh` that batches are split over (see `DATA_AXES`).

    **Arguments:**

    - `mesh`: a `jax.sharding.Mesh`, or the names of its axes.

    **Returns:** `"data"` if `mesh` has such an axis, else `"batch"`.

    **Raises:** `ValueError` if `mesh` has neither.
    """
    names = tuple(mesh.axis_names if isinstance(mesh, Mesh) else mesh)
    for name in DATA_AXES:
        if name in names:
            return name
    raise ValueError(
        f"The device mesh has axes {names} but no data axis to split batches "
        f"over: name one of them {DATA_AXES[0]!r} (or {DATA_AXES[1]!r}), e.g. "
        "`mesh={'data': 2, 'model': 2}`."
    )
