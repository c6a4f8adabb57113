"""Sharding rules: which axes of the experiment's arrays are split over the device mesh.

By default the Trainer replicates the experiment: every device holds all parameters and
optimizer state (data parallelism). A *sharding rule* instead splits large arrays over the
mesh, so each device keeps only a slice: FSDP / ZeRO-3 style. Nothing else changes in the
step: under `jax.jit`, XLA's SPMD partitioner sees the shardings and inserts the all-gathers
(before a parameter is used) and reduce-scatters (of its gradient) itself.

A rule is any callable `rule(path, shape, dtype, mesh) -> PartitionSpec | None`; `None` means
"not mine", and the next rule is asked; an array no rule claims is replicated. Rules only see
shapes, so the optimizer state (Adam's `mu`, `nu`), which has its parameters' shapes, is
sharded like the parameters.

**Example:**

```python
rules = [solstice.ByPath([(r"\\.embedding\\.weight$", PartitionSpec(None, "batch"))]),
         solstice.FullySharded(min_size=2**16)]
trainer = solstice.Trainer(max_epochs=10, sharding_rules=rules)
experiment = trainer.fit(experiment, datamodule)
print(trainer.describe_shardings())   # path, shape, spec and bytes per device of each array
```
"""

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import PyTree

ShardingRule = Callable[[str, tuple[int, ...], Any, Mesh], "PartitionSpec | None"]


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


@dataclasses.dataclass(frozen=True)
class FullySharded:
    """FSDP: split the largest evenly divisible axis of every large array over `axis`.

    **Arguments:**

    - `min_size`: arrays with fewer elements stay replicated (biases, norms, scalars: their
      all-gathers would cost more than the memory they save).
    - `axis`: the mesh axis to split over (the Trainer's mesh has one, `"batch"`).
    """

    min_size: int = 2**18
    axis: str = "batch"

    def __call__(
        self, path: str, shape: tuple[int, ...], dtype: Any, mesh: Mesh
    ) -> PartitionSpec | None:
        n = mesh.shape[self.axis]
        if n == 1 or math.prod(shape) < self.min_size:
            return None
        # largest axis first; ties: the last one (the output features of a weight matrix)
        for dim in sorted(range(len(shape)), key=lambda d: (shape[d], d), reverse=True):
            if shape[dim] % n == 0:
                spec: list[str | None] = [None] * len(shape)
                spec[dim] = self.axis
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
                f"devices, but {shape[dim]} is not divisible by {size}. Choose another axis "
                "or leave this array replicated."
            )


def experiment_shardings(tree: PyTree, mesh: Mesh, rules: Sequence[ShardingRule] = ()) -> PyTree:
    """A `NamedSharding` for every array of `tree`, from the first rule that claims it.

    PRNG keys and arrays no rule claims are replicated (`PartitionSpec()`).

    **Arguments:**

    - `tree`: a pytree of arrays (e.g. the array part of an experiment).
    - `mesh`: the device mesh.
    - `rules`: sharding rules, asked in order.

    **Returns:** a pytree of the same structure, with a `NamedSharding` per leaf.
    """
    replicated = PartitionSpec()

    def choose(path: tuple, x: Any) -> NamedSharding:
        spec = None
        if not _is_key(x):
            name = jax.tree_util.keystr(path)
            shape = tuple(np.shape(x))
            for rule in rules:
                spec = rule(name, shape, x.dtype, mesh)
                if spec is not None:
                    _check_spec(name, shape, spec, mesh)
                    break
        return NamedSharding(mesh, replicated if spec is None else spec)

    return jax.tree_util.tree_map_with_path(choose, tree)


def check_sharding_rules(rules: Any) -> tuple[ShardingRule, ...]:
    """`rules` as a tuple, or a `TypeError` naming what is not a rule."""
    if rules is None:
        return ()
    if callable(rules) or isinstance(rules, str) or not isinstance(rules, Sequence):
        raise TypeError(
            f"`sharding_rules` must be a list of rules, got {rules!r}. Wrap a single rule in "
            "a list: `sharding_rules=[solstice.FullySharded()]`."
        )
    for rule in rules:
        if not callable(rule):
            raise TypeError(
                f"`sharding_rules` holds {rule!r} of type {type(rule).__name__}, which is not "
                "a rule. A rule is a callable `rule(path, shape, dtype, mesh) -> "
                "PartitionSpec | None`, e.g. `solstice.FullySharded()` or `solstice.ByPath(...)`."
            )
    return tuple(rules)


def describe_shardings(tree: PyTree, shardings: PyTree) -> str:
    """A table of every array: path, shape, spec and the bytes each device holds."""
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
        rows.append(f"{jax.tree_util.keystr(path):<60} {shape!s:<16} {s.spec!s:<22} {local:>10}")
    header = f"{'array':<60} {'shape':<16} {'spec':<22} {'bytes/dev':>10}"
    footer = f"total {total} bytes; {per_device} bytes per device"
    return "\n".join([header, *rows, footer])
