"""`TraceLog`: counts the traces of the compiled steps and explains a retrace.

A retrace means a recompilation: it warns once per function, naming what changed (a batch
leaf's shape, a metric's dtype) and pointing at the user's step. A new experiment structure
(a hook changed a non-array field) compiles new functions, reported on its own
(`static_differences`), whose first traces are not retraces.
"""

import dataclasses
from typing import Any

import equinox as eqx
import jax
from jaxtyping import PyTree

from ._user_code import warn_at


def _signature(args: dict[str, PyTree]) -> dict[str, str]:
    """Shapes, dtypes and static values of named pytrees of arguments, by name and path
    (e.g. `batch['image']`)."""
    out = {}
    for name, tree in args.items():
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
            key = name + jax.tree_util.keystr(path)
            if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
                out[key] = f"{leaf.dtype}{list(leaf.shape)}"
            else:
                out[key] = repr(leaf)
    return out


def _describe_change(old: dict[str, str], new: dict[str, str]) -> str:
    changes = []
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            changes.append(f"`{key}`: {old.get(key, 'absent')} -> {new.get(key, 'absent')}")
    return "; ".join(changes[:5]) or "the structure of its arguments"


def static_differences(old: Any, new: Any, path: str) -> list[str]:
    """`"<path>: old -> new"` for every non-array value that differs between two static
    parts of experiments (arrays are `None` in both), fields of modules by name."""
    if old is new:
        return []
    if type(old) is not type(new):
        return [f"`{path}`: {type(old).__name__} -> {type(new).__name__}"]
    if isinstance(old, eqx.Module):
        return [
            change
            for field in dataclasses.fields(old)
            for change in static_differences(
                getattr(old, field.name, None),
                getattr(new, field.name, None),
                f"{path}.{field.name}",
            )
        ]
    if isinstance(old, list | tuple) and len(old) == len(new):
        return [
            c
            for i, (a, b) in enumerate(zip(old, new))
            for c in static_differences(a, b, f"{path}[{i}]")
        ]
    if isinstance(old, dict) and old.keys() == new.keys():
        return [c for k in old for c in static_differences(old[k], new[k], f"{path}[{k!r}]")]
    try:
        same = bool(old == new)
    except Exception:  # noqa: BLE001 - e.g. arrays compared elementwise: not equal here
        same = False
    return [] if same else [f"`{path}`: {old!r} -> {new!r}"]


class TraceLog:
    """Counts traces of each compiled function and warns once when one is retraced.

    A new experiment structure (`new_generation`, e.g. a hook changed a non-array field)
    compiles new functions: their first traces are not retraces.
    """

    def __init__(self) -> None:
        self.signatures: dict[str, list[dict[str, str]]] = {}
        self.warned: set[str] = set()
        self._generation = 0
        self._traced_in: dict[str, int] = {}  # name -> generation of its last trace

    def new_generation(self) -> None:
        self._generation += 1

    def record(self, name: str, args: dict[str, PyTree], source: Any = None) -> None:
        """Count a trace of `name` with named arguments `args`; `source` is the user's
        function it runs (the warning points there)."""
        sig = _signature(args)
        history = self.signatures.setdefault(name, [])
        history.append(sig)
        again = self._traced_in.get(name) == self._generation
        self._traced_in[name] = self._generation
        if again and name not in self.warned:
            self.warned.add(name)
            warn_at(
                source,
                f"The {name} step was traced again (trace #{len(history)}), which means a "
                f"recompilation: {_describe_change(history[-2], sig)}. Keep shapes, dtypes "
                "and non-array experiment fields constant between steps (store changing "
                "numbers as `jnp` arrays; only the last evaluation batch may be shorter).",
                RuntimeWarning,
            )

    def count(self, name: str) -> int:
        return len(self.signatures.get(name, []))
