"""Sharding rules: which axes of the experiment's arrays are split over the device mesh.

By default the Trainer replicates the experiment: every device holds all parameters and
optimizer state (data parallelism). A *sharding rule* instead splits large arrays over the
mesh, so each device keeps only a slice: FSDP / ZeRO-3 style. Nothing else changes in the
step: under `jax.jit`, XLA's SPMD partitioner sees the shardings and inserts the all-gathers
(before a parameter is used) and reduce-scatters (of its gradient) itself.

A rule is any callable `rule(path, shape, dtype, mesh) -> PartitionSpec | None`; `None` means
"not mine", and the next rule is asked; an array no rule claims is replicated. Rules only see
shapes, so the optimizer state (Adam's `mu`, `nu`), which has its parameters' shapes, is
sharded like the parameters. A `TreeRule` (such as `TensorParallel`) first looks at the whole
experiment once (`prepare`), to learn which arrays belong to which module. `Combined` applies
several rules to the same array, each over the axes the earlier ones left: tensor
parallelism over the mesh's `"model"` axis and FSDP over its `"data"` axis, for example.

**Example:**

```python
rules = [solstice.ByPath([(r"\\.embedding\\.weight$", PartitionSpec(None, "batch"))]),
         solstice.FullySharded(min_size=2**16)]
trainer = solstice.Trainer(max_epochs=10, sharding_rules=rules)
experiment = trainer.fit(experiment, datamodule)
print(trainer.describe_shardings())   # path, shape, spec and bytes per device of each array
```
"""

import abc
import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import PyTree

from .._mesh_axes import data_axis

ShardingRule = Callable[[str, tuple[int, ...], Any, Mesh], "PartitionSpec | None"]


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


@dataclasses.dataclass(frozen=True)
class FullySharded:
    """FSDP: split the largest evenly divisible axis of every large array over `axis`.

    **Arguments:**

    - `min_size`: arrays with fewer elements stay replicated (biases, norms, scalars: their
      all-gathers would cost more than the memory they save). Inside `Combined`, the
      elements of what the earlier rules left on each device.
    - `axis`: the mesh axis to split over; `None` (the default): the axis batches are split
      over, `"batch"` on the Trainer's default mesh, `"data"` on a mesh such as
      `{"data": 2, "model": 2}`.
    """

    min_size: int = 2**18
    axis: str | None = None

    def __call__(
        self, path: str, shape: tuple[int, ...], dtype: Any, mesh: Mesh
    ) -> PartitionSpec | None:
        axis = data_axis(mesh) if self.axis is None else self.axis
        if axis not in mesh.shape:
            raise ValueError(
                f"`FullySharded(axis={axis!r})`, but the mesh has axes {tuple(mesh.shape)}. "
                "Name one of them, or leave `axis=None` for the data axis."
            )
        n = mesh.shape[axis]
        if n == 1 or math.prod(shape) < self.min_size:
            return None
        # largest axis first; ties: the last one (the output features of a weight matrix)
        for dim in sorted(range(len(shape)), key=lambda d: (shape[d], d), reverse=True):
            if shape[dim] % n == 0:
                spec: list[str | None] = [None] * len(shape)
                spec[dim] = axis
                return PartitionSpec(*spec)
        return None


@dataclasses.dataclass(frozen=True)
class ByPath:
    """Explicit specs for arrays whose pytree path matches a regular expression.

    Paths are as `jax.tree_util.keystr` writes them, e.g. `.model.layers[0].weight` or
    `.optimizer.opt_state[0].mu.layers[0].weight`. The first matching pattern wins.

    **Arguments:**

    - `rules`: `(pattern, PartitionSpec)` pairs, matched with `re.search`.
    """

    rules: Sequence[tuple[str, PartitionSpec]]

    def __call__(
        self, path: str, shape: tuple[int, ...], dtype: Any, mesh: Mesh
    ) -> PartitionSpec | None:
        for pattern, spec in self.rules:
            if re.search(pattern, path):
                return spec
        return None


class TreeRule(abc.ABC):
    """A sharding rule that looks at the whole experiment first (e.g. to find its modules).

    The Trainer calls `prepare` once per experiment structure, with the experiment's arrays
    (`eqx.filter(experiment, eqx.is_array)`: modules keep their types) and the mesh, and asks
    the rule it returns about each array, as any other rule.
    """

    @abc.abstractmethod
    def prepare(self, tree: PyTree, mesh: Mesh) -> ShardingRule:
        """A plain rule `rule(path, shape, dtype, mesh) -> PartitionSpec | None` for `tree`."""


def prepare_rule(rule: "ShardingRule | TreeRule", tree: PyTree, mesh: Mesh) -> ShardingRule:
    """`rule` ready to be asked about the arrays of `tree` (see `TreeRule`)."""
    return rule.prepare(tree, mesh) if isinstance(rule, TreeRule) else rule


@dataclasses.dataclass(frozen=True, init=False)
class Combined(TreeRule):
    """Several rules applied to the same array, each splitting what the earlier ones left.

    Every rule is asked in turn, with the shape of one device's part after the earlier
    rules' splits (so `FullySharded` splits the largest axis that is left); their splits are
    merged into one `PartitionSpec`. Two rules splitting the same array axis split it over
    both mesh axes (`P(("model", "data"))`); two rules using the same mesh axis on one array
    are an error. An array no rule claims stays replicated.

    **Arguments:**

    - `*rules`: sharding rules (or `TreeRule`s), in order.

    **Example:**

    ```python
    # Megatron splits over "model", then FSDP over "data": a large matrix keeps a quarter
    # of itself on each device of a 2x2 mesh.
    rules = [solstice.Combined(solstice.TensorParallel(), solstice.FullySharded(axis="data"))]
    trainer = solstice.Trainer(mesh={"data": 2, "model": 2}, sharding_rules=rules)
    ```
    """

    rules: tuple[Any, ...]

    def __init__(self, *rules: "ShardingRule | TreeRule"):
        object.__setattr__(self, "rules", check_sharding_rules(list(rules)))

    def prepare(self, tree: PyTree, mesh: Mesh) -> ShardingRule:
        return Combined(*(prepare_rule(rule, tree, mesh) for rule in self.rules))

    def __call__(
        self, path: str, shape: tuple[int, ...], dtype: Any, mesh: Mesh
    ) -> PartitionSpec | None:
        spec: list[tuple[str, ...]] = [()] * len(shape)
        local, claimed = list(shape), False
        for rule in self.rules:
            if isinstance(rule, TreeRule):
                raise TypeError(f"{rule!r} must be prepared first (`Combined.prepare`).")
            got = rule(path, tuple(local), dtype, mesh)
            if got is None:
                continue
            _check_spec(path, tuple(local), got, mesh)
            claimed = True
            for dim, names in enumerate(got):
                names = () if names is None else names if isinstance(names, tuple) else (names,)
                taken = {name for entry in spec for name in entry}
                if taken & set(names):
                    raise ValueError(
                        f"`Combined` rules split `{path}` (shape {shape}) over mesh axis "
                        f"{sorted(taken & set(names))} twice ({rule!r} gave `{got}`). Give "
                        "the rules different mesh axes, e.g. `TensorParallel(axis='model')` "
                        "and `FullySharded(axis='data')`."
                    )
                spec[dim] += names
                local[dim] //= math.prod(mesh.shape[name] for name in names)
        if not claimed:
            return None
        return PartitionSpec(*(None if not e else e[0] if len(e) == 1 else e for e in spec))


def _check_spec(path: str, shape: tuple[int, ...], spec: PartitionSpec, mesh: Mesh) -> None:
    if len(spec) > len(shape):
        raise ValueError(
            f"Sharding rule gave `{spec}` for `{path}` of shape {shape}: more entries than "
            "the array has axes. Give one entry per axis (or fewer; the rest are replicated)."
        )
    for dim, names in enumerate(spec):
        if names is None:
            continue
        names = names if isinstance(names, tuple) else (names,)
        for name in names:
            if name not in mesh.shape:
                raise ValueError(
                    f"Sharding rule gave `{spec}` for `{path}`, but the mesh has no axis "
                    f"{name!r} (its axes: {tuple(mesh.shape)})."
                )
        size = math.prod(mesh.shape[name] for name in names)
        if shape[dim] % size:
            raise ValueError(
                f"Sharding rule splits axis {dim} of `{path}` (shape {shape}) over {size} "
                f"devices (mesh axis {' x '.join(names)}), but {shape[dim]} is not divisible "
                f"by {size}. Make that dimension a multiple of {size}, choose another axis "
                "or a smaller mesh axis, or leave this array replicated."
            )


def experiment_shardings(
    tree: PyTree, mesh: Mesh, rules: "Sequence[ShardingRule | TreeRule]" = ()
) -> PyTree:
    """A `NamedSharding` for every array of `tree`, from the first rule that claims it.

    PRNG keys and arrays no rule claims are replicated (`PartitionSpec()`).

    **Arguments:**

    - `tree`: a pytree of arrays (e.g. the array part of an experiment).
    - `mesh`: the device mesh.
    - `rules`: sharding rules, asked in order.

    **Returns:** a pytree of the same structure, with a `NamedSharding` per leaf.
    """
    replicated = PartitionSpec()
    prepared = [prepare_rule(rule, tree, mesh) for rule in rules]

    def choose(path: tuple, x: Any) -> NamedSharding:
        spec = None
        if not _is_key(x):
            name = jax.tree_util.keystr(path)
            shape = tuple(np.shape(x))
            for rule in prepared:
                spec = rule(name, shape, x.dtype, mesh)
                if spec is not None:
                    _check_spec(name, shape, spec, mesh)
                    break
        return NamedSharding(mesh, replicated if spec is None else spec)

    return jax.tree_util.tree_map_with_path(choose, tree)


def check_sharding_rules(rules: Any) -> tuple[Any, ...]:
    """`rules` as a tuple, or a `TypeError` naming what is not a rule."""
    if rules is None:
        return ()
    if callable(rules) or isinstance(rules, str) or not isinstance(rules, Sequence):
        raise TypeError(
            f"`sharding_rules` must be a list of rules, got {rules!r}. Wrap a single rule in "
            "a list: `sharding_rules=[solstice.FullySharded()]`."
        )
    for rule in rules:
        if not (callable(rule) or isinstance(rule, TreeRule)):
            raise TypeError(
                f"`sharding_rules` holds {rule!r} of type {type(rule).__name__}, which is not "
                "a rule. A rule is a callable `rule(path, shape, dtype, mesh) -> "
                "PartitionSpec | None`, e.g. `solstice.FullySharded()` or `solstice.ByPath(...)`."
            )
    return tuple(rules)


def _padded(spec: PartitionSpec, ndim: int) -> PartitionSpec:
    """`spec` with one entry per axis (jit writes `P('model',)` for `P('model', None)`)."""
    return PartitionSpec(*spec, *([None] * (ndim - len(spec))))


def describe_shardings(tree: PyTree, shardings: PyTree) -> str:
    """A table of every array: path, shape, spec and the bytes each device holds, under a
    line naming the mesh's axes and sizes."""
    meshes = {s.mesh.shape_tuple for s in jax.tree.leaves(shardings) if hasattr(s, "mesh")}
    axes = ", ".join(f"{n}={k}" for mesh in sorted(meshes) for n, k in mesh)
    rows = []
    total = per_device = 0
    for (path, x), s in zip(
        jax.tree_util.tree_leaves_with_path(tree), jax.tree.leaves(shardings), strict=True
    ):
        shape = tuple(np.shape(x))
        nbytes = math.prod(shape) * np.dtype(x.dtype).itemsize if not _is_key(x) else 0
        local = math.prod(s.shard_shape(shape)) * (nbytes // max(1, math.prod(shape)))
        total += nbytes
        per_device += local
        spec = _padded(s.spec, len(shape)) if hasattr(s, "spec") else s
        rows.append(f"{jax.tree_util.keystr(path):<60} {shape!s:<16} {spec!s:<28} {local:>10}")
    header = f"{'array':<60} {'shape':<16} {'spec':<28} {'bytes/dev':>10}"
    footer = f"total {total} bytes; {per_device} bytes per device"
    return "\n".join([f"mesh: {axes or '(none)'}", header, *rows, footer])
