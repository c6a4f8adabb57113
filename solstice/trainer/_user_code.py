"""Warnings that point at the user's code (the method that caused them), not at Solstice's."""

import inspect
import warnings
from collections.abc import Callable
from typing import Any

# One registry for `warn_explicit`: the "default" action then shows each warning once per
# place, as `warnings.warn` does.
_REGISTRY: dict[Any, Any] = {}


def warn_at(function: Callable[..., Any] | None, message: str, category: type[Warning]) -> None:
    """Issue `message` as if raised at the first line of `function` (a user's method, e.g.
    `type(experiment).train_step`); at the caller's caller if its source is unknown."""
    target = inspect.unwrap(function) if function is not None else None
    code = getattr(target, "__code__", None)
    if code is None:
        warnings.warn(message, category, stacklevel=3)
        return
    warnings.warn_explicit(
        message,
        category,
        filename=code.co_filename,
        lineno=code.co_firstlineno,
        module=getattr(target, "__module__", None) or "solstice",
        registry=_REGISTRY,
    )
