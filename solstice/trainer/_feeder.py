"""The feeder: validates host batches and puts them on the devices ahead of the step."""

import collections
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import PyTree

from ..datamodules._batching import batch_size_of, check_numeric, stack_length
from ._placement import Placement, aligned_empty, is_device_batch

_DONE = object()


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


class _Stacker:
    """Stacks up to `size` batches along a new leading axis as they arrive.

    Host batches are copied at once into buffers of our own (`aligned_empty`: on the CPU
    backend `device_put` then uses them in place), so a loader may reuse its buffers for the
    next batch; device batches are kept and stacked on the device.
    """

    def __init__(self, size: int):
        self.size = size
        self.count = 0
        self._items: list[PyTree] = []
        self._treedef: Any = None
        self._buffers: list[np.ndarray] | None = None

    def add(self, batch: PyTree) -> None:
        if self.count == 0:
            self._items = []
            self._buffers = None
            if not is_device_batch(batch):
                leaves, self._treedef = jax.tree.flatten(batch)
                self._buffers = [
                    aligned_empty((self.size, *np.shape(x)), np.asarray(x).dtype) for x in leaves
                ]
        if self._buffers is None:
            self._items.append(batch)
        else:
            for buffer, x in zip(self._buffers, self._treedef.flatten_up_to(batch)):
                buffer[self.count] = x
        self.count += 1

    @property
    def owned(self) -> bool:
        """Whether the stack is in host buffers of our own (see `Placement.put_stacked_batches`)."""
        return self._buffers is not None

    def batch(self, i: int) -> PyTree:
        """Batch `i` of the stack."""
        if self._buffers is None:
            return self._items[i]
        return jax.tree.unflatten(self._treedef, [buffer[i] for buffer in self._buffers])

    def take(self, *, exact: bool = False) -> PyTree:
        """The stack, padded to `size` with copies of the last batch (`exact`: only the
        batches added, unpadded); starts a new one."""
        n, self.count = self.count, 0
        if self._buffers is None:
            pad = [] if exact else [self._items[-1]] * (self.size - n)
            return jax.tree.map(lambda *xs: jnp.stack(xs), *self._items, *pad)
        if exact:
            return jax.tree.unflatten(self._treedef, [buffer[:n] for buffer in self._buffers])
        for buffer in self._buffers:
            buffer[n:] = buffer[n - 1]
        return jax.tree.unflatten(self._treedef, self._buffers)


# Chunked uploads (see `Feeder(chunked=True)`): a transfer costs ~40 us of host time however
# small the batch, so small batches travel together, up to this many bytes or batches.
CHUNK_BYTES = 4 << 20
MAX_CHUNK = 16


def chunk_size(batch: PyTree) -> int:
    """How many batches like `batch` one upload carries: 1 for batches of 4 MiB or more."""
    nbytes = sum(getattr(x, "nbytes", 0) for x in jax.tree.leaves(batch))
    return stack_length(nbytes, max_batches=MAX_CHUNK, max_bytes=CHUNK_BYTES)


def take_from_chunk(chunk: tuple[PyTree, jax.Array], step: jax.Array) -> PyTree:
    """Traced: batch `index` of an uploaded chunk `(stacked, index)` (a `gather` for the
    compiled step; `step` is unused)."""
    stacked, index = chunk
    return jax.tree.map(lambda x: x[index], stacked)


class BatchPreparer:
    """Checks a host training batch: every batch has the first one's size, which splits
    over the devices, and the experiment's `validate_batch` accepts it.

    **Arguments:**

    - `placement`: the devices the batch will be split over.
    - `validate`: the experiment's `validate_batch` (host-side checks), or `None`.
    """

    def __init__(self, placement: Placement, *, validate: Callable[[PyTree], None] | None = None):
        self.placement = placement
        self.validate = validate
        self.expected_size: int | None = None

    def __call__(self, batch: PyTree) -> PyTree:
        size = batch_size_of(batch)
        if self.expected_size is None:
            check_numeric(batch)
            self.expected_size = size
            self.placement.check_local_batch_size(size)
        elif size != self.expected_size:
            raise ValueError(
                f"Training batch of size {size} after batches of {self.expected_size}. "
                "Training batches must all have the same size (drop the last partial batch, "
                "as the built-in DataModules do)."
            )
        if self.validate is not None and not is_device_batch(batch):
            self.validate(batch)
        return batch

    def check_stacked(self, stacked: PyTree, n: int) -> None:
        """Check the first `n` batches of a host stack `(size, batch, ...)` that a loader
        gathered (`BatchLoader.iter_stacked`): its batches all have one size, so the size is
        checked once (as `__call__` does), and `validate` sees each batch."""
        leaves, treedef = jax.tree.flatten(stacked)
        batches = (jax.tree.unflatten(treedef, [x[i] for x in leaves]) for i in range(n))
        if self.expected_size is None:
            self(next(batches))
        if self.validate is not None:
            for batch in batches:
                self.validate(batch)


class InflightLimit:
    """Bounds how many compiled steps may be dispatched but not yet finished.

    JAX dispatch is asynchronous; unbounded, the host can run far ahead of the devices, and
    on multi-device CPU (jax 0.10) ~100 queued steps that contain collectives deadlock. Before
    dispatching more, wait for the step `max_inflight` calls back to *finish*: this only
    waits (never copies a value to the host) and, with several steps still queued, never
    leaves the device idle.
    """

    def __init__(self, max_inflight: int = 8):
        self.max_inflight = max_inflight
        self._tickets: collections.deque = collections.deque()

    def add(self, ticket: PyTree) -> None:
        """Record a just-dispatched step's (non-donated) output."""
        self._tickets.append(ticket)
        if len(self._tickets) > self.max_inflight:
            jax.block_until_ready(self._tickets.popleft())


class Prefetcher:
    """Iterates `items` on a background thread, up to `depth` items ahead of the consumer.

    Items are produced in order by one thread (so whatever `items` does, e.g. placing
    batches on the devices, happens off the training thread); an error raised while
    producing re-raises on the consuming thread, in order. `close()` (or leaving the `with`
    block) stops the thread and drops what was not consumed.

    **Example:**

    ```python
    with Prefetcher(place(b) for b in loader) as items:
        for item in items:
            ...
    ```
    """

    def __init__(self, items: Iterable[Any], *, depth: int = 2):
        self._items = items
        self._queue: queue.Queue = queue.Queue(maxsize=max(1, depth))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="solstice-feeder", daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        try:
            for item in self._items:
                if self._stop.is_set() or not self._put(item):
                    return
            self._put(_DONE)
        except BaseException as exc:  # noqa: BLE001 - re-raised on the consumer thread
            self._put(_Failure(exc))

    def __iter__(self) -> Iterator[Any]:
        while True:
            item = self._queue.get()
            if item is _DONE:
                return
            if isinstance(item, _Failure):
                raise item.exc
            yield item

    def close(self) -> None:
        """Stop the background thread (drops items not yet consumed)."""
        self._stop.set()
        self._thread.join(timeout=10)

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class Feeder(Prefetcher):
    """Iterates training batches prepared and put on the devices on a background thread,
    `depth` ahead of the step.

    With `chunked=True` (single steps on small host batches), items are `(n, stacked)`:
    `n` consecutive batches uploaded together in one transfer (see `chunk_size`), padded to
    a fixed chunk size; the step takes its batch out of the chunk (`take_from_chunk`). With
    `stacked=True` as well, `batches` yields such `(n, stacked)` host chunks already, in
    buffers of our own (`BatchLoader.iter_stacked` with `empty=aligned_empty`), which
    `prepare.check_stacked` checks (`prepare` is then a `BatchPreparer`).

    With `group > 1`, consecutive batches are stacked `(group, batch, ...)` for fused steps;
    the first `lead` batches and a final remainder are yielded batch by batch, so that fused
    chunks always end on a global step that is a multiple of `group`. Items are `(num_steps, device_batch)`.
    Errors raised while reading or checking data re-raise on the consuming thread.

    **Example:**

    ```python
    with Feeder(loader, prepare, placement, depth=2) as feeder:
        for n, batch in feeder:
            ...
    ```
    """

    def __init__(
        self,
        batches: Iterable[PyTree],
        prepare: Callable[[PyTree], PyTree],
        placement: Placement,
        *,
        depth: int = 2,
        group: int = 1,
        lead: int = 0,
        chunked: bool = False,
        stacked: bool = False,
        microbatches: int = 1,
    ):
        if stacked and not chunked:
            raise ValueError("`stacked=True` feeds chunks: it needs `chunked=True`.")
        self._batches = batches
        self._prepare = prepare
        self._placement = placement
        self._group = group
        self._lead = lead
        self._micro = microbatches
        if microbatches > 1:
            items = self._microbatch_items()
        elif stacked:
            items = self._stacked_items()
        elif chunked:
            items = self._chunk_items()
        else:
            items = self._step_items()
        super().__init__(items, depth=depth)

    def _step_items(self) -> Iterator[tuple[int, PyTree]]:
        stack = _Stacker(self._group)
        lead = self._lead
        for batch in self._batches:
            if lead > 0 or self._group == 1:  # single steps (until chunks line up)
                lead = max(0, lead - 1)
                yield 1, self._placement.put_batch(self._prepare(batch))
                continue
            stack.add(self._prepare(batch))
            if stack.count == self._group:
                owned = stack.owned
                yield self._group, self._placement.put_stacked_batches(stack.take(), owned=owned)
        for i in range(stack.count):  # the remainder, batch by batch
            yield 1, self._placement.put_batch(stack.batch(i))

    def _microbatch_items(self) -> Iterator[tuple[int, PyTree]]:
        """Items `(n, stacked)` of `n` optimizer steps of `microbatches` batches each,
        stacked `(n * microbatches, batch, ...)`: single steps for the first `lead` steps,
        then `group` steps at a time; at the end, the full steps left one by one, then the
        last r < `microbatches` batches as one (partial) step."""
        k, group = self._micro, self._group
        single = _Stacker(k)
        fused = _Stacker(k * group) if group > 1 else None
        lead = self._lead
        for batch in self._batches:
            batch = self._prepare(batch)
            if fused is None or lead > 0:
                single.add(batch)
                if single.count == k:
                    lead = max(0, lead - 1)
                    yield 1, self._put_stack(single)
            else:
                fused.add(batch)
                if fused.count == fused.size:
                    yield group, self._put_stack(fused)
        for i in range(0 if fused is None else fused.count):  # what is left, step by step
            single.add(fused.batch(i))  # type: ignore[union-attr]
            if single.count == k:
                yield 1, self._put_stack(single)
        if single.count:
            yield 1, self._put_stack(single)

    def _put_stack(self, stack: "_Stacker") -> PyTree:
        """The stack's batches on the devices: all `size` of them, or the `count` so far."""
        owned = stack.owned
        return self._placement.put_stacked_batches(stack.take(exact=True), owned=owned)

    def _chunk_items(self) -> Iterator[tuple[int, PyTree]]:
        """Items `(n, stacked)`: `n` batches stacked along a new leading axis, padded to the
        chunk size (a repeated last batch) so every upload has the same shape."""
        stack = None
        for batch in self._batches:
            batch = self._prepare(batch)
            if stack is None:
                stack = _Stacker(chunk_size(batch))
            stack.add(batch)
            if stack.count == stack.size:
                yield self._chunk(stack)
        if stack is not None and stack.count:
            yield self._chunk(stack)

    def _stacked_items(self) -> Iterator[tuple[int, PyTree]]:
        """Items `(n, stacked)` from chunks the loader gathered into our own buffers."""
        for n, stacked in self._batches:
            self._prepare.check_stacked(stacked, n)  # type: ignore[attr-defined]
            yield n, self._placement.put_stacked_batches(stacked, owned=True)

    def _chunk(self, stack: "_Stacker") -> tuple[int, PyTree]:
        n, owned = stack.count, stack.owned
        return n, self._placement.put_stacked_batches(stack.take(), owned=owned)
