"""Batch helpers: batch-size checks, and padding of a short evaluation batch (which the Trainer
does for experiments that honour a mask, see `Experiment.honours_mask`)."""

from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from jaxtyping import PyTree

MASK_KEY = "mask"

_NARROW = {
    np.dtype(np.int64): np.dtype(np.int32),
    np.dtype(np.uint64): np.dtype(np.uint32),
    np.dtype(np.float64): np.dtype(np.float32),
    np.dtype(np.complex128): np.dtype(np.complex64),
}


def narrow_64bit(x: np.ndarray) -> np.ndarray:
    """`x` with a 64-bit dtype made 32-bit, as JAX without x64 would store it anyway (done
    here, explicitly, by the adapters of other libraries' data); unchanged with x64 on."""
    if jax.config.jax_enable_x64:  # type: ignore[attr-defined]
        return x
    target = _NARROW.get(x.dtype)
    return x if target is None else x.astype(target)


def stack_length(batch_nbytes: int, *, max_batches: int, max_bytes: int) -> int:
    """How many batches of `batch_nbytes` bytes one stack holds: as many as fit in
    `max_bytes`, at least 1 and at most `max_batches`."""
    return max(1, min(max_batches, max_bytes // max(1, batch_nbytes)))


def batch_size_of(batch: PyTree) -> int:
    """Return the leading-axis size shared by every leaf of `batch`.

    Raises `ValueError`, naming each leaf's path and size, if they disagree.
    """
    leaves = jax.tree_util.tree_leaves_with_path(batch)
    if not leaves:
        raise ValueError("A batch must contain at least one array; got an empty pytree.")
    sizes = {}
    for path, leaf in leaves:
        shape = np.shape(leaf)
        if len(shape) == 0:
            raise ValueError(
                f"Batch leaf `{jax.tree_util.keystr(path)}` is a scalar; every leaf of a batch "
                "needs a leading batch axis. Give it shape `(batch_size, ...)`."
            )
        sizes[jax.tree_util.keystr(path)] = shape[0]
    if len(set(sizes.values())) != 1:
        listing = ", ".join(f"`{k}`: {v}" for k, v in sizes.items())
        raise ValueError(
            f"Batch leaves disagree on the batch size ({listing}). Every leaf must share the "
            "same leading axis; check how the batch is built."
        )
    return next(iter(sizes.values()))


_KINDS = {
    "O": "Python objects",
    "U": "strings",
    "S": "bytes",
    "M": "datetimes",
    "m": "timedeltas",
    "V": "raw records",
}


def check_numeric(batch: PyTree, what: str = "batch") -> None:
    """Raise `TypeError` naming the first leaf of `batch` that is not numbers or booleans
    (strings, Python objects, ...), which cannot go to the devices."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(batch):
        dtype = getattr(leaf, "dtype", None)
        dtype = np.asarray(leaf).dtype if dtype is None else np.dtype(dtype)
        if dtype.kind not in "biufc":
            raise TypeError(
                f"`{what}{jax.tree_util.keystr(path)}` has dtype {dtype} "
                f"({_KINDS.get(dtype.kind, 'not numbers')}): only numbers and booleans can go "
                "to the devices. Convert it (e.g. string labels to class indices with "
                "`np.unique(labels, return_inverse=True)[1]`) or leave it out of the batch."
            )


def pad_rows(batch: PyTree, size: int) -> PyTree:
    """Pad every leaf of a pytree batch with zero rows up to `size` rows.

    **Example:**

    ```python
    pad_rows((np.ones((3, 2)), np.arange(3)), 4)   # ((4, 2) last row 0, [0, 1, 2, 0])
    ```
    """
    n = batch_size_of(batch)
    if n > size:
        raise ValueError(f"Cannot pad a batch of {n} rows down to {size}.")

    def pad(x):
        x = np.asarray(x)
        if n == size:
            return x
        return np.pad(x, [(0, size - n)] + [(0, 0)] * (x.ndim - 1))

    return jax.tree.map(pad, batch)


def pad_batch(batch: Mapping[str, Any], size: int) -> dict[str, Any]:
    """Pad every leaf of a dict batch to `size` rows and add a boolean `"mask"` (True = real).

    If the batch already has a `"mask"`, it is padded with `False`. The Trainer does this to
    every evaluation batch of an experiment that honours the mask (`Experiment.honours_mask`),
    so the short last batch runs in the same compiled step as the others. The entries come
    out in `jax.tree.map`'s order (sorted keys), then `"mask"`.

    **Example:**

    ```python
    pad_batch({"x": np.ones((3, 2))}, 4)   # {"x": (4, 2), last row 0; "mask": [T, T, T, F]}
    ```
    """
    if not isinstance(batch, Mapping):
        raise TypeError(
            f'Only dict batches can carry a `"mask"` entry, got `{type(batch).__name__}`. '
            "Use `pad_rows` for other pytrees."
        )
    n = _flat_rows(batch)
    flat = n is not None
    if n is None:
        n = batch_size_of(batch)
    if n > size:
        raise ValueError(f"Cannot pad a batch of {n} rows down to {size}.")
    out = dict(batch)
    mask = np.asarray(out.pop(MASK_KEY, np.ones((n,), dtype=bool)), dtype=bool)

    def pad(x):
        x = np.asarray(x)
        if n == size:
            return x
        widths = [(0, size - n)] + [(0, 0)] * (x.ndim - 1)
        return np.pad(x, widths)

    if flat and n == size:  # a full batch of a flat dict (every batch but the last)
        out = {k: out[k] for k in sorted(out)}
    else:
        out = jax.tree.map(pad, out)
    out[MASK_KEY] = pad(mask)
    return out


def _flat_rows(batch: Mapping[str, Any]) -> int | None:
    """The shared leading size of a `dict` of numpy arrays with `str` keys (the batches of
    the built-in loaders), without pytree overhead; `None` for anything else, which
    `batch_size_of` then checks."""
    if type(batch) is not dict:
        return None
    n = None
    for k, v in batch.items():
        if type(k) is not str or type(v) is not np.ndarray or v.ndim == 0:
            return None
        if n is None:
            n = v.shape[0]
        elif v.shape[0] != n:
            return None
    return n
