"""Where an epoch's training batches come from: one interface over the data paths.

- **gathered**: a device-resident loader (`Loader.device_epoch`) on the Trainer's devices;
  each compiled step gathers its own batch, keyed by the on-device step counter. No upload.
- **chunked**: small host batches of single steps travel in chunks (one upload for up to 16
  steps, `Feeder(chunked=True)`), gathered into our buffers by the loader when it can
  (`Loader.iter_stacked`); each step takes its batch from the chunk on the device.
- **fed**: host batches (or stacks of `steps_per_execution` of them) put on the devices by
  the feeder thread, ahead of the step. With microbatches (`accumulate_grad_batches=K`)
  every item is a stack: the K batches of each of its optimizer steps (fewer at an epoch
  end). A gathered microbatched step gathers each of its microbatches in turn.

The loop sees only `TrainInput`: `(num_steps, batch)` items, and what the compiled step
must do with them (`gather`, `decode`, `length`).
"""

import contextlib
import dataclasses
import itertools
import logging
import warnings
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
from jaxtyping import PyTree

from ..datamodules import Loader
from . import _feeder
from ._feeder import BatchPreparer, Feeder, take_from_chunk
from ._placement import aligned_empty

if TYPE_CHECKING:
    from ._run import Run

log = logging.getLogger("solstice")


class Microbatched(NamedTuple):
    """A gathered item of microbatched steps: the loader's device data, and how many
    microbatches each of the item's optimizer steps gathers from it."""

    data: Any
    microbatches: int


@dataclasses.dataclass
class TrainInput:
    """An epoch's training input: `items` are `(num_steps, batch)`; `gather` (traced, keyed by
    the step counter) and `decode` (a loader's deferred transform) run inside the step;
    `length` is the number of fused steps of a gathered item."""

    items: Iterable[tuple[int, PyTree]]
    gather: Callable[[Any, jax.Array], PyTree] | None = None
    decode: Callable[[PyTree], PyTree] | None = None
    length: int | None = None
    accumulate: int = 1

    def spec(self, n: int, batch: PyTree) -> PyTree:
        """The shapes of one step's batch, as `train_step` receives it."""
        if self.gather is not None:
            spec = jax.eval_shape(self.gather, self.data(batch), jnp.int32(0))
        else:
            spec = self.loader_batch(n, batch, 0)
        return spec if self.decode is None else jax.eval_shape(self.decode, spec)

    def loader_batches(self, n: int, batch: PyTree) -> int:
        """How many loader batches an item of `n` steps holds: `n`, or with microbatches
        (`accumulate > 1`) its stack's length (`n * accumulate`, or fewer at an epoch end)."""
        if self.accumulate == 1:
            return n
        if isinstance(batch, Microbatched):
            return n * batch.microbatches
        return jax.tree.leaves(batch)[0].shape[0]

    @staticmethod
    def data(batch: PyTree) -> PyTree:
        """What the compiled step receives of an item."""
        return batch.data if isinstance(batch, Microbatched) else batch

    def loader_batch(self, n: int, batch: PyTree, i: int) -> PyTree:
        """Loader batch `i` of an item of `n` steps (a fed item: not gathered)."""
        if n == 1 and self.accumulate == 1:
            return batch
        return jax.tree.map(lambda x: x[i], batch)


def batches_from(loader: Loader, start: int, count: int | None) -> Iterator[PyTree]:
    """The loader's batches from index `start`, at most `count - start` of them."""
    it = loader.iter_from(start) if start else iter(loader)
    if count is None:
        return it
    return itertools.islice(it, max(0, count - start))


def _device_schedule(progress: Any, total: int, fused: int, data: Any):
    """`(num_steps, data)` items for the rest of a device-resident epoch: single steps until
    the global step is a multiple of `fused`, then fused chunks, then single steps."""
    remaining = max(0, total - progress.batch_idx)
    lead = min(remaining, (-progress.global_step) % fused)
    for _ in range(lead):
        yield 1, data
    remaining -= lead
    if fused > 1:
        for _ in range(remaining // fused):
            yield fused, data
        remaining %= fused
    for _ in range(remaining):
        yield 1, data


def _microbatch_schedule(progress: Any, total: int, fused: int, k: int, data: Any):
    """`(num_steps, Microbatched)` items for the rest of a device-resident epoch of
    optimizer steps of `k` microbatches: as `_device_schedule` in steps, then one partial
    step over the last r < k batches."""
    remaining = max(0, total - progress.batch_idx)
    steps = _device_schedule(dataclasses.replace(progress, batch_idx=0), remaining // k, fused, 0)
    for n, _ in steps:
        yield n, Microbatched(data, k)
    if remaining % k:
        yield 1, Microbatched(data, remaining % k)


def _gathered(run: "Run", loader: Loader, count: int | None) -> TrainInput | None:
    """The gathered path, if `loader` keeps the epoch on exactly the Trainer's devices. With
    microbatches (`k > 1`) the gather is keyed by `global_step * k + j` (microbatch `j`),
    so the epoch's batch 0 is at `k` times the epoch's first optimizer step."""
    progress, fused = run.progress, run.trainer.steps_per_execution
    k = run.trainer.accumulate_grad_batches
    if loader.mesh is None:
        return None
    if loader.mesh != run.placement.mesh:
        if "mesh" not in run.trainer._slow_paths_warned:  # once per Trainer
            run.trainer._slow_paths_warned.add("mesh")
            warnings.warn(
                f"The `{type(loader).__name__}` keeps its data on other devices than the "
                "Trainer's, so every batch is copied to the Trainer's devices instead of being "
                "gathered inside the step (much slower). Give the DataModule the Trainer's "
                "mesh (`mesh=trainer.mesh`), or the same `devices=`.",
                RuntimeWarning,
                stacklevel=6,
            )
        return None
    first_step = k * (progress.global_step - progress.batch_idx // k)
    found = loader.device_epoch(first_step=first_step)
    if found is None:
        return None
    gather, data = found
    total = loader.num_batches() if count is None else count
    if total is None:
        return None
    if k > 1:
        items = _microbatch_schedule(progress, total, fused, k, data)
        return TrainInput(items, gather, None, None, k)
    return TrainInput(_device_schedule(progress, total, fused, data), gather, None, fused)


def _chunk_steps(feeder: Feeder, placement: Any) -> Iterator[tuple[int, PyTree]]:
    """`(1, (chunk, index))` for every batch of every uploaded chunk (see `take_from_chunk`)."""
    indices = None
    for n, chunk in feeder:
        if indices is None:
            indices = placement.index_scalars(jax.tree.leaves(chunk)[0].shape[0])
        for i in range(n):
            yield 1, (chunk, indices[i])


@contextlib.contextmanager
def train_input(
    run: "Run", loader: Loader, count: int | None, needs_batches: bool
) -> Iterator[TrainInput]:
    """The epoch's input from batch `run.progress.batch_idx` on (`count`: how many batches
    the epoch has, `None` if unknown). `needs_batches`: per-batch hooks (or `detect_anomaly`)
    need each step's own batch on this side of the step: no gathering, chunks or decoding
    inside it."""
    accumulate = run.trainer.accumulate_grad_batches
    gathered = None if needs_batches else _gathered(run, loader, count)
    if gathered is not None:
        yield gathered
        return
    trainer, progress, placement = run.trainer, run.progress, run.placement
    split = None if needs_batches else loader.split_transform()
    loader, decode = (loader, None) if split is None else split
    fused = trainer.steps_per_execution
    # (device batches of a loader on other devices are not chunked: they are on a device)
    chunked = (
        fused == 1
        and accumulate == 1
        and not needs_batches
        and not placement.multi_process
        and loader.mesh is None
    )
    stacks = None
    if chunked:  # a loader that gathers whole chunks into our buffers saves a copy per batch
        stacks = loader.iter_stacked(
            progress.batch_idx,
            count,
            max_batches=_feeder.MAX_CHUNK,
            max_bytes=_feeder.CHUNK_BYTES,
            empty=aligned_empty,
        )
    feeder = Feeder(
        stacks if stacks is not None else batches_from(loader, progress.batch_idx, count),
        BatchPreparer(placement, validate=run.experiment.validate_batch),
        placement,
        depth=trainer.prefetch,
        group=fused,
        lead=(-progress.global_step) % fused,
        chunked=chunked,
        stacked=stacks is not None,
        microbatches=accumulate,
    )
    with feeder:
        items = _chunk_steps(feeder, placement) if chunked else feeder
        yield TrainInput(items, take_from_chunk if chunked else None, decode, None, accumulate)
