"""Turning a mapping of metric values (Python numbers, numpy scalars, 0-d JAX arrays) into
`dict[str, float]`."""

import numbers
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

_REAL_KINDS = (jnp.bool_, jnp.integer, jnp.floating)


def check_scalars(metrics: Mapping[str, Any]) -> None:
    """Check that every value of `metrics` is a real scalar, without copying anything from
    the device (it only reads `.shape` and `.dtype`, which JAX keeps on the host).

    Raises `TypeError` for a key that is not a string or a value that is not a real number,
    and `ValueError` for an array that is not 0-d.
    """
    if not isinstance(metrics, Mapping):
        raise TypeError(
            f"Metrics must be a mapping of name -> scalar, got {type(metrics).__name__}. "
            "Pass a dict such as `{'train/loss': loss}`."
        )
    for key, value in metrics.items():
        if not isinstance(key, str):
            raise TypeError(
                f"Metric names must be strings, got {key!r} of type {type(key).__name__}. "
                "Use names such as `'train/loss'`."
            )
        if isinstance(value, bool | numbers.Real):
            continue
        if isinstance(value, np.ndarray | np.generic | jax.Array):
            if value.shape != ():
                raise ValueError(
                    f"Metric {key!r} has shape {tuple(value.shape)}, but loggers take scalars "
                    "(shape `()`). Reduce it first, e.g. `jnp.mean(x)`, or log each element "
                    "under its own name."
                )
            if not any(jnp.issubdtype(value.dtype, kind) for kind in _REAL_KINDS):
                raise TypeError(
                    f"Metric {key!r} has dtype {value.dtype}, but loggers take real numbers "
                    "(bool, integer or floating dtypes). Convert it, e.g. `jnp.abs(x)`."
                )
            continue
        raise TypeError(
            f"Metric {key!r} is {value!r} of type {type(value).__name__}, but loggers take real "
            "numbers (Python numbers, numpy scalars or 0-d JAX arrays). Log text as a "
            "hyperparameter instead."
        )


def to_floats(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Convert `metrics` to a plain `dict[str, float]`.

    JAX arrays are copied to the host together (one `jax.device_get` for all of them), so
    calling this waits for the device: do it off the training thread
    (`solstice.loggers.AsyncLogger` does).

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
    check_scalars(metrics)
    host = jax.device_get(list(metrics.values()))  # a list keeps the caller's key order
    return {key: float(value) for key, value in zip(metrics, host)}
