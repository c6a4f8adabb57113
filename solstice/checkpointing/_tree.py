"""Pytrees to stored leaves and back: pytree paths, shapes, dtypes, PRNG keys, mismatches."""

import dataclasses
from collections.abc import Sequence
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PyTree


def is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


@dataclasses.dataclass(frozen=True)
class LeafSpec:
    """What the checkpoint says about one array: where it is, its shape and its dtype."""

    path: str
    shape: tuple[int, ...]
    dtype: str
    weak_type: bool = False

    @classmethod
    def of(cls, path: str, x: Any) -> "LeafSpec":
        weak = bool(getattr(x, "weak_type", False))
        return cls(path, tuple(int(d) for d in x.shape), str(x.dtype), weak)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "LeafSpec":
        return cls(d["path"], tuple(d["shape"]), d["dtype"], bool(d.get("weak_type", False)))

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "shape": list(self.shape),
            "dtype": self.dtype,
            "weak_type": self.weak_type,
        }

    def describe(self) -> str:
        return f"{self.dtype}[{', '.join(map(str, self.shape))}]"


def leaves_with_paths(tree: PyTree) -> tuple[list[str], list[Any], Any]:
    """The array leaves of `tree` with their pytree paths (`.model.layers[0].weight`)."""
    pairs, treedef = jax.tree_util.tree_flatten_with_path(tree)
    paths = [jax.tree_util.keystr(p) for p, _ in pairs]
    if len(set(paths)) != len(paths):
        raise ValueError(
            "Two leaves of the pytree have the same path, so they cannot be saved by name. "
            "Give the pytree's nodes distinct keys (e.g. register custom nodes with "
            "`jax.tree_util.register_pytree_with_keys`)."
        )
    return paths, [x for _, x in pairs], treedef


def specs(tree: PyTree) -> list[LeafSpec]:
    paths, leaves, _ = leaves_with_paths(tree)
    return [LeafSpec.of(p, x) for p, x in zip(paths, leaves)]


def storage_key(i: int) -> str:
    return f"{i:06d}"


def to_storage(tree: PyTree) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """`({"000000": array, ...}, [leaf spec JSON, ...])`; PRNG keys are stored as their data."""
    paths, leaves, _ = leaves_with_paths(tree)
    stored = {
        storage_key(i): jax.random.key_data(x) if is_key(x) else x for i, x in enumerate(leaves)
    }
    return stored, [LeafSpec.of(p, x).to_json() for p, x in zip(paths, leaves)]


def mismatch_report(
    saved: Sequence[LeafSpec], template: Sequence[LeafSpec]
) -> tuple[list[str], list[str], list[str]]:
    """`(missing, unexpected, mismatched)` descriptions, by pytree path."""
    saved_by = {s.path: s for s in saved}
    template_by = {t.path: t for t in template}
    missing = [f"{t.path} ({t.describe()})" for t in template if t.path not in saved_by]
    unexpected = [f"{s.path} ({s.describe()})" for s in saved if s.path not in template_by]
    mismatched = []
    for t in template:
        s = saved_by.get(t.path)
        if s is not None and (s.shape != t.shape or s.dtype != t.dtype):
            mismatched.append(f"{t.path}: checkpoint {s.describe()}, template {t.describe()}")
    return missing, unexpected, mismatched


def check_structure(
    saved: Sequence[LeafSpec], template: Sequence[LeafSpec], *, source: str, template_name: str
) -> None:
    """Raise `ValueError` listing every difference between a checkpoint and a template."""
    missing, unexpected, mismatched = mismatch_report(saved, template)
    if not (missing or unexpected or mismatched):
        return
    lines = [f"The checkpoint `{source}` does not fit the template `{template_name}`:"]
    for title, items in (
        ("in the template but missing from the checkpoint", missing),
        ("in the checkpoint but not in the template (unexpected)", unexpected),
        ("shape or dtype mismatch", mismatched),
    ):
        if items:
            lines.append(f"- {title} ({len(items)}):")
            lines.extend(f"    {item}" for item in items[:20])
            if len(items) > 20:
                lines.append(f"    ... and {len(items) - 20} more")
    lines.append(
        "Build the template exactly as for the run that wrote the checkpoint (same model "
        "configuration, optimizer and experiment class); only its array values are replaced."
    )
    raise ValueError("\n".join(lines))


def _storage_keys(saved: Sequence[LeafSpec], paths: Sequence[str]) -> list[str]:
    index = {s.path: i for i, s in enumerate(saved)}
    return [storage_key(index[p]) for p in paths]


def abstract_storage(
    template: PyTree, saved: Sequence[LeafSpec], shardings: Sequence[jax.sharding.Sharding]
) -> dict[str, jax.ShapeDtypeStruct]:
    """What Orbax should restore for each leaf of `template` (keyed as saved), placed on
    `shardings` (one per leaf). `saved` must match `template` by path (`check_structure`)."""
    paths, leaves, _ = leaves_with_paths(template)
    out = {}
    for key, x, sharding in zip(_storage_keys(saved, paths), leaves, shardings):
        stored = jax.eval_shape(jax.random.key_data, x) if is_key(x) else x
        out[key] = jax.ShapeDtypeStruct(stored.shape, stored.dtype, sharding=sharding)
    return out


def _make_weak(x: jax.Array) -> jax.Array:
    """A weakly typed copy of `x` (as a Python scalar would make), so that a restored
    experiment promotes dtypes exactly like the one that was saved."""
    try:
        from jax._src.lax.lax import _convert_element_type
    except ImportError:  # pragma: no cover - depends on the jax version
        if x.ndim == 0:
            return jax.device_put(x.item(), x.sharding)
        return x
    return jax.jit(lambda v: _convert_element_type(v, v.dtype, weak_type=True))(x)


def _key_impl(x: Any) -> Any:
    try:
        return jax.random.key_impl(x)
    except TypeError:  # an abstract key (`jax.ShapeDtypeStruct`) in the template
        return x.dtype._impl


def is_array_like(x: Any) -> bool:
    """An array, or an abstract one (`jax.ShapeDtypeStruct`, e.g. from
    `eqx.filter_eval_shape`): a leaf that a checkpoint fills in."""
    return eqx.is_array(x) or isinstance(x, jax.ShapeDtypeStruct)


def from_storage(template: PyTree, saved: Sequence[LeafSpec], stored: dict[str, Any]) -> PyTree:
    """Rebuild `template`'s pytree from arrays restored with `abstract_storage` (PRNG keys
    re-wrapped, weak types as saved, numpy leaves of the template kept numpy)."""
    paths, leaves, treedef = leaves_with_paths(template)
    saved_by = {s.path: s for s in saved}
    out = []
    for key, path, x in zip(_storage_keys(saved, paths), paths, leaves):
        value = stored[key]
        if is_key(x):
            value = jax.random.wrap_key_data(value, impl=_key_impl(x))
        elif saved_by[path].weak_type and not getattr(value, "weak_type", False):
            value = _make_weak(value)
        if isinstance(x, np.ndarray) and not isinstance(value, np.ndarray):
            value = np.asarray(value)
        out.append(value)
    return jax.tree_util.tree_unflatten(treedef, out)


@jax.jit
def _all_finite(leaves: list[jax.Array]) -> jax.Array:
    checks = [jnp.all(jnp.isfinite(x)) for x in leaves]
    return jnp.all(jnp.stack(checks)) if checks else jnp.asarray(True)


def all_finite(tree: PyTree) -> bool:
    """Whether every floating-point array of `tree` is finite (one small device reduction)."""
    leaves = [
        x
        for x in jax.tree.leaves(tree)
        if isinstance(x, jax.Array) and not is_key(x) and jnp.issubdtype(x.dtype, jnp.inexact)
    ]
    return bool(_all_finite(leaves)) if leaves else True
