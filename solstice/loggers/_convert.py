"""Turning a mapping of metric values (Python numbers, numpy scalars, 0-d JAX arrays) into
`dict[str, float]`."""

import numbers
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._packed import PackedMetrics

_REAL_KINDS = (jnp.bool_, jnp.integer, jnp.floating)
_real_dtypes: set[Any] = set()  # dtypes already found to be real (a cache for `_check_one`)


def check_scalars(metrics: Mapping[str, Any]) -> None:
    """Check that every value of `metrics` is a real scalar, without copying anything from
    the device (it only reads `.shape` and `.dtype`, which JAX keeps on the host).

    Raises `TypeError` for a key that is not a string or a value that is not a real number,
    and `ValueError` for an array that is not 0-d.

    A `PackedMetrics` is checked without touching its vector: its entries are 0-d floats by
    construction, so only its names and its other values are looked at.
    """
    _check(metrics)


def _check(metrics: Mapping[str, Any]) -> bool:
    """`check_scalars`; returns whether `metrics` is a plain mapping of `str` -> `float`."""
    if isinstance(metrics, PackedMetrics):
        for key in metrics.names:
            if type(key) is not str:
                _check_one(key, 0.0)
        items: Iterable[tuple[Any, Any]] = metrics.rest.items()
        plain = False
    elif isinstance(metrics, Mapping):
        items = metrics.items()
        plain = True
    else:
        raise TypeError(
            f"Metrics must be a mapping of name -> scalar, got {type(metrics).__name__}. "
            "Pass a dict such as `{'train/loss': loss}`."
        )
    for key, value in items:
        if type(key) is not str or type(value) is not float:  # floats: the common case
            plain = False
            if type(key) is not str or type(value) is not int:
                _check_one(key, value)
    return plain


def _check_one(key: Any, value: Any) -> None:
    if not isinstance(key, str):
        raise TypeError(
            f"Metric names must be strings, got {key!r} of type {type(key).__name__}. "
            "Use names such as `'train/loss'`."
        )
    if isinstance(value, bool | numbers.Real):
        return
    if isinstance(value, np.ndarray | np.generic | jax.Array):
        if value.shape != ():
            raise ValueError(
                f"Metric {key!r} has shape {tuple(value.shape)}, but loggers take scalars "
                "(shape `()`). Reduce it first, e.g. `jnp.mean(x)`, or log each element "
                "under its own name."
            )
        dtype = value.dtype
        if dtype not in _real_dtypes:
            if not any(jnp.issubdtype(dtype, kind) for kind in _REAL_KINDS):
                raise TypeError(
                    f"Metric {key!r} has dtype {dtype}, but loggers take real numbers "
                    "(bool, integer or floating dtypes). Convert it, e.g. `jnp.abs(x)`."
                )
            _real_dtypes.add(dtype)
        return
    raise TypeError(
        f"Metric {key!r} is {value!r} of type {type(value).__name__}, but loggers take real "
        "numbers (Python numbers, numpy scalars or 0-d JAX arrays). Log text as a "
        "hyperparameter instead."
    )


def to_floats(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Convert `metrics` to a plain `dict[str, float]`.

    JAX arrays are copied to the host together (one `jax.device_get` for all of them; a
    `PackedMetrics` with one copy of its vector), so calling this waits for the device: do it
    off the training thread (`solstice.loggers.AsyncLogger` does).

    **Arguments:**

    - `metrics`: a mapping of name -> Python number, numpy scalar or 0-d JAX array.

    **Returns:**

    A new `dict` with the same keys, in the same order, and `float` values.

    Raises `ValueError` naming the key and its shape for a value that is not a scalar.

    **Example:**

    ```python
    to_floats({"train/loss": jnp.asarray(0.25), "epoch": 1})  # {"train/loss": 0.25, "epoch": 1.0}
    ```
    """
    return many_to_floats([metrics])[0]


def many_to_floats(batch: list[Mapping[str, Any]]) -> list[dict[str, float]]:
    """`to_floats` of each mapping of `batch`, with one `jax.device_get` for all the JAX
    arrays of the plain mappings among them (a `PackedMetrics` converts itself:
    `host_floats()`)."""
    out: list[dict[str, float]] = []
    pending: list[tuple[dict[str, float], str, jax.Array]] = []
    for metrics in batch:
        if _check(metrics):  # already plain floats (e.g. converted by a `FanoutLogger`)
            out.append(dict(metrics))
            continue
        if isinstance(metrics, PackedMetrics):  # one copy for all its floating scalars
            out.append(metrics.host_floats())
            continue
        values: dict[str, Any] = {}
        for key, value in metrics.items():
            if type(value) is float:
                values[key] = value
            elif isinstance(value, jax.Array):
                pending.append((values, key, value))
                values[key] = 0.0  # a placeholder, keeping the key's place
            else:
                values[key] = float(value)
        out.append(values)
    if pending:
        host = jax.device_get([value for _, _, value in pending])
        for (values, key, _), value in zip(pending, host):
            values[key] = float(value)
    return out
