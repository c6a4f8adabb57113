"""Whether experiments share one static structure, and the first place where they do not.

A `Population` stacks the arrays of its members and keeps one non-array part (member 0's)
for all of them, so every member must have the same non-array part: the same classes and
configuration, the same array shapes and dtypes. Functions are compared by what they
compute, not by identity: two `optax.adam(1e-3)` built separately are equal (same code,
equal captured values), `optax.adam(1e-3)` and `optax.adam(1e-2)` are not.
"""

import dataclasses
import functools
import types
from typing import Any

import equinox as eqx
import numpy as np


def _array_difference(a: Any, b: Any, path: str) -> str | None:
    if not eqx.is_array(b):
        return f"`{path}`: an array in member 0, `{type(b).__name__}` here"
    if a.shape != b.shape or a.dtype != b.dtype:
        return f"`{path}`: shape {a.shape} dtype {a.dtype} in member 0, {b.shape} {b.dtype} here"
    return None


def _contents(cell: Any) -> Any:
    try:
        return cell.cell_contents
    except ValueError:  # an empty cell (a name not bound yet)
        return None


def _function_difference(a: Any, b: Any, path: str, depth: int) -> str | None:
    if a is b:
        return None
    if getattr(a, "__code__", None) is not getattr(b, "__code__", None):
        return f"`{path}`: function `{a.__qualname__}` in member 0, `{b.__qualname__}` here"
    cells_a, cells_b = a.__closure__ or (), b.__closure__ or ()
    names = a.__code__.co_freevars
    for name, ca, cb in zip(names, cells_a, cells_b, strict=True):
        found = difference(_contents(ca), _contents(cb), f"{path}.<{name}>", depth + 1)
        if found:
            return found
    return difference(a.__defaults__, b.__defaults__, f"{path}.<defaults>", depth + 1)


def _sequence_difference(a: Any, b: Any, path: str, depth: int) -> str | None:
    if len(a) != len(b):
        return f"`{path}`: {len(a)} items in member 0, {len(b)} here"
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        found = difference(x, y, f"{path}[{i}]", depth + 1)
        if found:
            return found
    return None


def difference(a: Any, b: Any, path: str = "member", depth: int = 0) -> str | None:
    """The first place where `b` differs from `a` in structure (not in array values), as
    "`path`: what member 0 has, what `b` has"; `None` when they match."""
    if depth > 50 or a is b:
        return None
    if eqx.is_array(a):
        return _array_difference(a, b, path)
    if type(a) is not type(b):
        return f"`{path}`: `{type(a).__name__}` in member 0, `{type(b).__name__}` here"
    if isinstance(a, eqx.Module) or dataclasses.is_dataclass(a):
        for field in dataclasses.fields(a):
            found = difference(
                getattr(a, field.name, None),
                getattr(b, field.name, None),
                f"{path}.{field.name}",
                depth + 1,
            )
            if found:
                return found
        return None
    if isinstance(a, types.FunctionType):
        return _function_difference(a, b, path, depth)
    if isinstance(a, types.MethodType):
        return difference(a.__func__, b.__func__, path, depth + 1) or difference(
            a.__self__, b.__self__, f"{path}.__self__", depth + 1
        )
    if isinstance(a, functools.partial):
        return difference((a.func, a.args, a.keywords), (b.func, b.args, b.keywords), path, depth)
    if isinstance(a, (tuple, list)):
        return _sequence_difference(a, b, path, depth)
    if isinstance(a, dict):
        if list(a) != list(b):
            return f"`{path}`: keys {list(a)} in member 0, {list(b)} here"
        return _sequence_difference(list(a.values()), list(b.values()), path, depth)
    try:
        equal = a == b
        same = bool(equal) if not isinstance(equal, np.ndarray) else bool(np.all(equal))
    except Exception:  # an object without a usable `==`: only itself is itself
        same = False
    return None if same else f"`{path}`: {a!r} in member 0, {b!r} here"
