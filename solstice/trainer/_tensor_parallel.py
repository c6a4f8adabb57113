"""`TensorParallel`: Megatron-style splits of Equinox's linear layers over a mesh axis.

A *column-parallel* layer keeps a slice of the output features on each device (weight
`(out, in)` split on `out`, bias split too); a *row-parallel* layer a slice of the input
features (weight split on `in`, bias whole). A column layer followed by a row layer needs
no communication in between: each device computes its slice of the hidden features, and
the row layer's partial outputs are summed once (an all-reduce that XLA's SPMD partitioner
inserts under `jax.jit`, as it inserts everything else; the step's code does not change).
"""

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
from jax.sharding import Mesh, PartitionSpec
from jaxtyping import PyTree

from ._sharding_rules import ShardingRule, TreeRule

_MODULES = (eqx.nn.MLP, eqx.nn.MultiheadAttention, eqx.nn.Linear)
_KINDS = ("column", "row")


@dataclasses.dataclass(frozen=True)
class TensorParallel(TreeRule):
    """Tensor parallelism: split the linear layers of Equinox modules over a mesh axis.

    Found anywhere in the experiment (by walking it once, see `TreeRule`):

    - `eqx.nn.MLP`: its layers alternate column-parallel (layers 0, 2, ...) and row-parallel
      (layers 1, 3, ...), so each column/row pair runs with one all-reduce. The last layer
      of an MLP with an odd number of layers (`depth` even) stays replicated (typically the
      small output layer, which then needs no gather of its output).
    - `eqx.nn.MultiheadAttention`: the query, key and value projections column-parallel
      (whole heads per device: `num_heads` must divide by the axis size), the output
      projection row-parallel.
    - a lone `eqx.nn.Linear` whose path matches a pattern of `linear`.

    Optimizer state shaped like the model (Adam's `mu`, `nu`, ...) is split like the
    parameters: it holds the same modules. So is an array of the parameter's shape whose path
    ends with the parameter's path less its first key (the experiment's field), e.g.
    `.optimizer.state.mu.mlp.layers[0].weight` for `.model.mlp.layers[0].weight`. Every other
    array is left to the next rule (see `Combined` to add FSDP over the data axis).

    A `linear` pattern that matches no layer, and an experiment in which nothing is found to
    split, are `ValueError`s naming the `Linear` layers there are (a tensor-parallel run
    must not silently replicate).

    **Arguments:**

    - `axis`: the mesh axis to split over (e.g. `"model"` of `mesh={"data": 2, "model": 2}`).
    - `linear`: `(pattern, "column" | "row")` pairs for `eqx.nn.Linear` layers outside MLPs
      and attention, matched with `re.search` against the layer's path (as
      `jax.tree_util.keystr` writes it, e.g. `.model.head`).
    - `mlp`, `attention`: split the MLPs / attention layers found (default `True`).

    **Example:**

    ```python
    rules = [solstice.Combined(solstice.TensorParallel(axis="model"),
                               solstice.FullySharded(axis="data"))]
    trainer = solstice.Trainer(mesh={"data": 2, "model": 2}, sharding_rules=rules)
    ```
    """

    axis: str = "model"
    linear: Sequence[tuple[str, str]] = ()
    mlp: bool = True
    attention: bool = True

    def __post_init__(self) -> None:
        for pair in self.linear:
            if not (isinstance(pair, tuple) and len(pair) == 2 and pair[1] in _KINDS):
                raise ValueError(
                    f"`TensorParallel(linear=...)` takes (pattern, 'column' | 'row') pairs, "
                    f"got {pair!r}. For example `linear=[(r'\\.head$', 'column')]`."
                )

    def prepare(self, tree: PyTree, mesh: Mesh) -> ShardingRule:
        if self.axis not in mesh.shape:
            raise ValueError(
                f"`TensorParallel(axis={self.axis!r})`, but the mesh has axes "
                f"{tuple(mesh.shape)}. Give the Trainer a mesh with that axis (e.g. "
                f"`mesh={{'data': 2, {self.axis!r}: 2}}`) or name one of its axes."
            )
        specs: dict[str, tuple[tuple[int, ...], PartitionSpec]] = {}
        nodes = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_module)[0]
        matched: set[str] = set()
        linears: list[str] = []
        for path, node in nodes:
            base = jax.tree_util.keystr(path)
            if isinstance(node, eqx.nn.MLP) and self.mlp:
                last = len(node.layers) - 1
                for i, layer in enumerate(node.layers):
                    if i % 2 == 0 and i == last:
                        continue  # an odd count: the output layer stays replicated
                    self._split(specs, f"{base}.layers[{i}]", layer, _KINDS[i % 2])
            elif isinstance(node, eqx.nn.MultiheadAttention) and self.attention:
                self._check_heads(base, node.num_heads, mesh)
                for name in ("query_proj", "key_proj", "value_proj"):
                    self._split(specs, f"{base}.{name}", getattr(node, name), "column")
                self._split(specs, f"{base}.output_proj", node.output_proj, "row")
            elif isinstance(node, eqx.nn.Linear):
                linears.append(base)
                for pattern, kind in self.linear:
                    if re.search(pattern, base):
                        self._split(specs, base, node, kind)
                        matched.add(pattern)
                        break
        self._check_found(specs, [p for p, _ in self.linear if p not in matched], linears)
        return _BySplit(specs)

    def _check_found(self, specs: dict, unmatched: list[str], linears: list[str]) -> None:
        """Raise if a `linear` pattern matched no layer, or nothing at all is split: a
        tensor-parallel run that silently replicates is the mistake to catch."""
        found = ", ".join(f"`{p}`" if p else "the root" for p in linears[:8]) or "none"
        if unmatched:
            raise ValueError(
                "`TensorParallel(linear=...)`: the pattern(s) "
                f"{', '.join(f'`{p}`' for p in unmatched)} match no "
                f"`eqx.nn.Linear` outside MLPs and attention. Such layers, by path: {found}. "
                "Fix the pattern (matched with `re.search` against these paths) or drop it."
            )
        if not specs:
            raise ValueError(
                "`TensorParallel` found nothing to split: no `eqx.nn.MLP` or "
                "`eqx.nn.MultiheadAttention` (with `mlp`/`attention` on) and no "
                f"`eqx.nn.Linear` named by `linear=` (such layers, by path: {found}). Name "
                "the layers to split with `linear=[(pattern, 'column' | 'row')]`, or leave "
                "`TensorParallel` out."
            )

    def _split(self, specs: dict, base: str, layer: Any, kind: str) -> None:
        for name in ("weight", "bias"):
            x = getattr(layer, name, None)
            if x is None or not hasattr(x, "shape"):
                continue
            if kind == "column":
                spec = PartitionSpec(self.axis, *([None] * (x.ndim - 1)))
            elif name == "weight":
                spec = PartitionSpec(None, self.axis)
            else:
                continue  # a row-parallel layer's bias is added once, whole
            specs[f"{base}.{name}"] = (tuple(x.shape), spec)

    def _check_heads(self, path: str, heads: int, mesh: Mesh) -> None:
        n = mesh.shape[self.axis]
        if heads % n:
            raise ValueError(
                f"`TensorParallel(axis={self.axis!r})` splits the heads of the attention "
                f"layer `{path}` over {n} devices, but it has {heads} heads. Use a number "
                f"of heads that is a multiple of {n}, or a smaller {self.axis!r} axis."
            )


def _is_module(x: Any) -> bool:
    return isinstance(x, _MODULES)


def _keys(path: str) -> list[str]:
    """The keys of a `keystr` path: `.a.b[0]` -> `['.a', '.b', '[0]']`."""
    return re.findall(r"\.[^.\[]+|\[[^\]]*\]", path)


@dataclasses.dataclass(frozen=True)
class _BySplit:
    """The specs `TensorParallel.prepare` found, as a rule: by exact path, else for an array
    of the same shape whose path ends with a split array's path less its first key (the
    experiment's field: `.model`), as optimizer state built on the model has it."""

    specs: dict[str, tuple[tuple[int, ...], PartitionSpec]]

    def __post_init__(self) -> None:
        within = {}
        for path, (shape, spec) in self.specs.items():
            keys = _keys(path)
            if len(keys) > 1:
                within["".join(keys[1:])] = (shape, spec)
        object.__setattr__(self, "_within", within)

    def __call__(
        self, path: str, shape: tuple[int, ...], dtype: Any, mesh: Mesh
    ) -> PartitionSpec | None:
        found = self.specs.get(path)
        if found is not None:
            return found[1]
        keys = _keys(path)
        for start in range(1, len(keys)):
            found = self._within.get("".join(keys[start:]))  # type: ignore[attr-defined]
            if found is not None and found[0] == shape:
                return found[1]
        return None
