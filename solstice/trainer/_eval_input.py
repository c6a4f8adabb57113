"""Evaluation input: every sample counts exactly once, whatever `eval_step` knows of padding.

Loaders yield real rows only; the last evaluation batch may be shorter than the others. How it
runs depends on the experiment:

- An experiment that declares `honours_mask = True` (its `eval_step` and `predict_step` ignore
  the rows where `batch["mask"]` is false, as `ClassificationExperiment`'s do) gets a boolean
  `"mask"` in every dict batch, and the short batch padded to the full size: one compiled
  step for all batches.
- Any other experiment (or a batch that is not a dict) gets the short batch at its own size,
  in a compiled function of its own (`<stage>_last_batch`: one more compile per stage, which
  the retrace warning does not flag). It is split over the devices when its size allows, else
  every device runs all of it.

With several processes each process holds its share of every batch, and a share of the short
batch may be shorter still, or empty: the shares are padded to full size on the feeder thread,
and at the last batch the processes exchange how many real rows each holds (`finish_last`, on
the main thread, once per run); the real rows are then taken out of the padded global batch on
the devices.
"""

from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PyTree

from ..datamodules._batching import MASK_KEY, batch_size_of, check_numeric, pad_batch, pad_rows
from ._placement import Placement, is_device_batch


class EvalBatch(NamedTuple):
    """One evaluation (or predict) batch, on the devices.

    - `batch`: the batch, placed on the mesh.
    - `short`: run it with the stage's last-batch function (it has its own size).
    - `keep`: the rows of the step's per-row outputs that are real (`None`: all), as a host
      index (a `slice` or an array of row positions): what `predict` keeps.
    - `local_rows`: this process's real rows.
    - `exchange`: the last batch of several processes' host data, padded to full shares:
      `EvalPreparer.finish_last` must run on it (on the main thread) before the step.
    """

    batch: PyTree
    short: bool = False
    keep: slice | np.ndarray | None = None
    local_rows: int = 0
    exchange: bool = False


def with_last(items: Iterable[Any]) -> Iterator[tuple[Any, bool]]:
    """`(item, is_last)` for every item (one item of look-ahead)."""
    it = iter(items)
    try:
        previous = next(it)
    except StopIteration:
        return
    for item in it:
        yield previous, False
        previous = item
    yield previous, True


@jax.jit
def _device_mask(batch: PyTree, rows: jax.Array) -> PyTree:
    """A device dict batch with a `"mask"` entry: the first `rows` rows are real."""
    size = batch_size_of(batch)
    return {**batch, MASK_KEY: jnp.arange(size) < rows}


def _pad_device(batch: PyTree, size: int, sharding: Any) -> PyTree:
    """A device batch padded with zero rows to `size` rows, laid out as `sharding`."""

    def pad(x):
        return jnp.pad(x, [(0, size - x.shape[0])] + [(0, 0)] * (x.ndim - 1))

    return jax.jit(lambda b: jax.tree.map(pad, b), out_shardings=sharding)(batch)


class EvalPreparer:
    """Checks and places evaluation batches (called on the feeder thread, in order). Host
    batches must be copies of our own (`owned_copy`: the look-ahead of `with_last` holds a
    batch while the loader makes the next, possibly in the same buffers).

    **Arguments:**

    - `placement`: the devices.
    - `honours_mask`: the experiment's `honours_mask` (see the module docstring).
    - `validate`: the experiment's `validate_batch` (host batches), or `None`.
    - `batch_size`: the loader's global batch size if it declares one, else `None` (the first
      batch's size is then the full size).
    """

    def __init__(
        self,
        placement: Placement,
        *,
        honours_mask: bool,
        validate: Callable[[PyTree], None] | None = None,
        batch_size: int | None = None,
    ):
        self.placement = placement
        self.honours_mask = honours_mask
        self.validate = validate
        self.declared = batch_size
        self.full: int | None = None  # rows of a full batch (this process's; global on device)
        self.masked: bool | None = None  # every batch gets a "mask" (decided on the first)
        self.short_seen = False

    def _full_size(self, size: int, on_device: bool) -> int:
        if self.full is None:
            declared = self.declared
            if declared is not None and not on_device:
                declared //= self.placement.process_count
            self.full = size if declared is None else declared
        return self.full

    def __call__(self, item: tuple[PyTree, bool]) -> EvalBatch:
        batch, last = item
        placement = self.placement
        on_device = is_device_batch(batch)
        size = batch_size_of(batch)
        first = self.full is None
        full = self._full_size(size, on_device)
        if self.short_seen:
            raise ValueError(
                f"An evaluation batch of {size} rows came after a shorter one (batches have "
                f"{full} rows): only the last batch of an evaluation split may be shorter than "
                "the others. Yield full batches, and the remainder last."
            )
        if size > full:
            raise ValueError(
                f"Evaluation batch of {size} rows after batches of {full}: an evaluation "
                "split's batches must all have the same size, except a shorter last one."
            )
        if self.validate is not None and not on_device and size:
            self.validate(batch)
        short = size < full
        if first:
            check_numeric(batch)
            self.masked = self.honours_mask and isinstance(batch, Mapping)
            single = not placement.multi_process
            if single and last and not short and size % placement.local_data_shards:
                # A lone batch that does not split over the devices: at its own size.
                short, self.masked = True, False
            if not (single and short and not self.masked):  # anything else is split
                placement.check_local_batch_size(full)
        self.short_seen = short
        if on_device:
            return self._device(batch, size, full, short)
        if placement.multi_process:
            batch = pad_batch(batch, full) if self.masked else pad_rows(batch, full)
            return EvalBatch(placement.put_batch(batch, owned=True), local_rows=size, exchange=last)
        if self.masked:
            keep = slice(0, size) if short else None
            return EvalBatch(placement.put_batch(pad_batch(batch, full), owned=True), keep=keep)
        if short:
            return EvalBatch(placement.put_rows(batch, owned=True), short=True)
        return EvalBatch(placement.put_batch(batch, owned=True))

    def _device(self, batch: PyTree, size: int, full: int, short: bool) -> EvalBatch:
        """A batch a device-resident loader gathered: global, already on the mesh."""
        placement = self.placement
        if self.masked:
            if short:  # on this mesh first (the loader's may be another), then padded
                batch = _pad_device(placement.put_rows(batch), full, placement.batch_sharding)
            batch = _device_mask(placement.put_batch(batch), size)
            return EvalBatch(batch, keep=slice(0, size) if short else None)
        if short:
            return EvalBatch(placement.put_rows(batch), short=True)
        return EvalBatch(placement.put_batch(batch))

    def finish_last(self, item: EvalBatch) -> EvalBatch:
        """On the main thread, for the last batch of several processes' host data: exchange
        the real row counts (a collective, at the same point in every process) and take the
        real rows out of the padded global batch (for a masked batch: note which to keep)."""
        if not item.exchange:
            return item
        from jax.experimental import multihost_utils

        counts = np.asarray(multihost_utils.process_allgather(np.int32(item.local_rows)))
        local = self.full
        assert local is not None  # (set by the first batch)
        positions = np.concatenate([p * local + np.arange(n) for p, n in enumerate(counts)])
        item = item._replace(exchange=False)
        if len(positions) == local * len(counts):
            return item  # every share was full
        if self.masked:
            return item._replace(keep=positions)
        return item._replace(batch=self.placement.take_rows(item.batch, positions), short=True)
