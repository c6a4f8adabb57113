"""Turning a (nested) mapping of hyperparameters into values every backend can store."""

import numbers
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

Primitive = bool | int | float | str


def _primitive(value: Any) -> Primitive:
    """A bool, int, float or str for `value`: numbers stay numbers, everything else (lists,
    arrays of more than one element, `None`, objects) becomes its string form."""
    if isinstance(value, bool | str):
        return value
    if isinstance(value, np.ndarray | np.generic | jax.Array) and value.shape == ():
        value = np.asarray(jax.device_get(value)).item()
        if isinstance(value, bool | str):
            return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return str(value)


def check_hparams(params: Any) -> None:
    """Raise `TypeError` unless `params` is a mapping."""
    if not isinstance(params, Mapping):
        raise TypeError(
            f"Hyperparameters must be a mapping of name -> value, got "
            f"{type(params).__name__}. Pass a dict such as `{{'lr': 1e-3, 'batch_size': 128}}`."
        )


def flatten_hparams(params: Mapping[str, Any], sep: str = "/") -> dict[str, Primitive]:
    """Flatten nested mappings into one level, joining keys with `sep`
    (`{"optim": {"lr": 0.1}}` -> `{"optim/lr": 0.1}`); values become bool, int, float or
    str (anything else, lists and `None` included, is stored as its string form)."""
    check_hparams(params)
    flat: dict[str, Primitive] = {}

    def visit(prefix: str, mapping: Mapping[Any, Any]) -> None:
        for key, value in mapping.items():
            name = f"{prefix}{sep}{key}" if prefix else str(key)
            if isinstance(value, Mapping):
                visit(name, value)
            else:
                flat[name] = _primitive(value)

    visit("", params)
    return flat


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    return _primitive(value)


def jsonable_hparams(params: Mapping[str, Any]) -> dict[str, Any]:
    """The same nesting as `params` (mappings stay dicts, lists and tuples become lists),
    with string keys and every leaf a bool, int, float or str, so that `json.dumps`
    accepts it."""
    check_hparams(params)
    return _jsonable(params)
