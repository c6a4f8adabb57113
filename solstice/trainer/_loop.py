"""The loops: one training epoch, one evaluation run, one predict run.

Nothing here reads a device value back except at log intervals and epoch ends.
"""

import collections
import contextlib
import itertools
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

from . import _feeder
from ._eval_input import EvalPreparer, with_last
from ._feeder import BatchPreparer, Feeder, Prefetcher, take_from_chunk
from ._flat import FlatTree
from ._placement import aligned_empty, owned_copy

if TYPE_CHECKING:
    from ._trainer import Trainer

PyTree = Any


def num_batches(loader: Iterable, limit: int | float | None, what: str) -> int | None:
    """How many batches to take from `loader` given a `limit_*_batches` setting."""
    try:
        length = len(loader)  # type: ignore[arg-type]
    except TypeError:
        length = None
    if limit is None:
        return length
    if isinstance(limit, float):
        if length is None:
            raise ValueError(
                f"`{what}={limit}` is a fraction, but the dataloader has no `len()`. Pass an "
                "int number of batches instead."
            )
        return max(1, int(length * limit)) if length else 0
    return limit if length is None else min(limit, length)


def batches_from(loader: Iterable, start: int, count: int | None) -> Iterable[PyTree]:
    """The loader's batches from index `start`, at most `count - start` of them."""
    if start:
        it = (
            loader.iter_from(start)
            if hasattr(loader, "iter_from")
            else itertools.islice(loader, start, None)
        )
    else:
        it = loader
    if count is not None:
        it = itertools.islice(it, max(0, count - start))
    return it


def _device_epoch(trainer: "Trainer", loader: Any, batch_hooks: bool) -> Any:
    """`(gather, data)` if this epoch's batches can be gathered inside the compiled step.

    That needs a device-resident loader (`device_epoch`) on exactly the Trainer's devices,
    and no per-batch hook (those receive the batch itself).
    """
    if batch_hooks or not hasattr(loader, "device_epoch"):
        return None
    mesh = getattr(loader, "mesh", None)
    if mesh is None or tuple(mesh.devices.flat) != tuple(trainer._placement.devices):
        return None
    progress = trainer.progress
    return loader.device_epoch(first_step=progress.global_step - progress.batch_idx)


def _device_schedule(data: Any, progress: Any, total_batches: int, fused: int):
    """`(num_steps, data)` items for the rest of a device-resident epoch: single steps until
    the global step is a multiple of `fused`, then fused chunks, then single steps."""
    remaining = max(0, total_batches - progress.batch_idx)
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


def _split_transform(loader: Any, hooks_need_batches: bool) -> tuple[Any, Any]:
    """`(loader, decode)`: a host loader whose transform can run on the device yields its
    batches before it (e.g. `uint8` pixels: 4x less to upload) and the compiled step applies
    `decode`. Not when per-batch hooks must see the transformed batch."""
    if hooks_need_batches or not hasattr(loader, "split_transform"):
        return loader, None
    return loader.split_transform()


def _chunk_steps(feeder: Feeder, placement: Any):
    """`(1, (chunk, index))` for every batch of every uploaded chunk (see `take_from_chunk`)."""
    indices = None
    for n, chunk in feeder:
        if indices is None:
            indices = placement.index_scalars(jax.tree.leaves(chunk)[0].shape[0])
        for i in range(n):
            yield 1, (chunk, indices[i])


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


def _slice(tree: PyTree, i: int) -> PyTree:
    return jax.tree.map(lambda x: x[i], tree)


def run_train_epoch(trainer: "Trainer", loader: Iterable, count: int | None) -> None:
    """Run (the rest of) one training epoch; stops early on `should_stop` or `max_steps`."""
    progress = trainer.progress
    hooks = trainer._hooks
    steps = trainer._steps
    fused = trainer.steps_per_execution
    batch_start = hooks.active("on_train_batch_start")
    batch_end = hooks.active("on_train_batch_end")
    # Per-batch hooks, and `detect_anomaly`'s check, need each step's own batch on the host
    # side of the step: no gathering inside the step, no chunks, no decode inside it.
    need_batches = batch_start or batch_end or trainer.detect_anomaly
    if trainer.max_steps is not None:
        remaining = progress.batch_idx + max(0, trainer.max_steps - progress.global_step)
        count = remaining if count is None else min(count, remaining)
    prepare = BatchPreparer(trainer._placement, validate=trainer.experiment.validate_batch)
    state = trainer._train_state
    inflight = InflightLimit()
    source = _device_epoch(trainer, loader, need_batches)
    decode = None
    if source is not None:  # gathered inside the compiled step: no feeder, no per-step upload
        gather, data = source
        total_batches = len(loader) if count is None else count
        items = _device_schedule(data, progress, total_batches, fused)
        feeder = contextlib.nullcontext()
    else:
        loader, decode = _split_transform(loader, need_batches)
        # Single steps on host data upload small batches in chunks (one transfer for
        # several steps); each step takes its batch from the chunk on the device.
        chunked = (
            fused == 1
            and not need_batches
            and not trainer._placement.multi_process
            and not hasattr(loader, "device_epoch")
        )
        gather = take_from_chunk if chunked else None
        # A loader that gathers whole chunks into our buffers saves a copy per batch.
        stacked = chunked and getattr(loader, "stackable", False)
        if stacked:
            batches = loader.iter_stacked(
                progress.batch_idx,
                count,
                max_batches=_feeder.MAX_CHUNK,
                max_bytes=_feeder.CHUNK_BYTES,
                empty=aligned_empty,
            )
        else:
            batches = batches_from(loader, progress.batch_idx, count)
        feeder = Feeder(
            batches,
            prepare,
            trainer._placement,
            depth=trainer.prefetch,
            group=fused,
            lead=(-progress.global_step) % fused,
            chunked=chunked,
            stacked=stacked,
        )
        items = _chunk_steps(feeder, trainer._placement) if chunked else feeder
    length = fused if source is not None else None  # gathered chunks are always K long
    dyn_state = trainer._dyn_state
    dyn_def = dyn_state.treedef
    train_fns: dict = {}  # built once per epoch: (fused?, closing?) -> compiled function

    def train_fn(n: int, closing: bool):
        fn = train_fns.get((n, closing))
        if fn is None:
            defs = (dyn_state.treedef, state.acc_flat.treedef)
            if n == 1:
                fn = steps.train(*defs, closing=closing, gather=gather, decode=decode)
            else:
                fn = steps.train_many(*defs, gather=gather, length=length, decode=decode)
            train_fns[(n, closing)] = fn
        return fn

    with feeder:
        for n, batch in items:
            if state.acc_flat.treedef is None or trainer.train_batch_size is None:
                if gather is not None:
                    spec = jax.eval_shape(gather, batch, jnp.int32(0))
                else:
                    spec = batch if n == 1 else jax.tree.map(lambda x: x[0], batch)
                if decode is not None:
                    spec = jax.eval_shape(decode, spec)
                if trainer.train_batch_size is None:  # global size, from shapes only
                    trainer.train_batch_size = jax.tree.leaves(spec)[0].shape[0]
                if state.acc_flat.treedef is None:
                    state.init(steps, trainer._dyn, spec)
                trainer._at_first_batch(spec)
            if batch_start:
                for i in range(n):
                    hooks.call(
                        trainer,
                        "on_train_batch_start",
                        batch if n == 1 else _slice(batch, i),
                        progress.batch_idx + i,
                    )
            closes = (progress.global_step + n) % trainer.log_every_n_steps == 0
            # Single steps close the log interval in the same call (one dispatch, not two);
            # fused calls close it separately, which costs one call per K steps anyway and
            # keeps a ragged epoch to at most one extra compiled function.
            close_inside = closes and fused == 1
            args = [
                dyn_state.leaves,
                state.acc_flat.leaves,
                batch,
                state.reset_flag(),
                trainer._guard,
                trainer._step_counter,
            ]
            if n == 1:
                args += (
                    (state.total_flat.leaves, state.epoch_flag()) if close_inside else (None, None)
                )
            if trainer._steps is not steps or dyn_state.treedef is not dyn_def:
                # A hook replaced the experiment with one of another structure: its steps.
                steps, dyn_def = trainer._steps, dyn_state.treedef
                train_fns.clear()
            out = train_fn(n, close_inside)(*args)
            dyn_state.leaves, state.acc_flat.leaves = out[0], out[1]
            step_metrics, trainer._guard, trainer._step_counter = out[2:5]
            if close_inside:
                packed, state.total_flat.leaves = out[5:]
            inflight.add(trainer._step_counter)
            if trainer.detect_anomaly:
                trainer._check_anomaly(batch, n, progress.global_step)
            state.steps_in_interval += n
            for i in range(n):
                progress.global_step += 1
                progress.batch_idx += 1
                if batch_end:
                    one = step_metrics if n == 1 else _slice(step_metrics, i)
                    hooks.call(
                        trainer,
                        "on_train_batch_end",
                        steps.metrics("train", one),
                        batch if n == 1 else _slice(batch, i),
                        progress.batch_idx - 1,
                    )
            if close_inside:  # the step closed the log interval on the device as well
                trainer._publish_train_interval(packed)
            elif closes:
                trainer._close_train_interval()
            trainer._step_boundary()  # step-triggered checkpoints, SIGINT/SIGTERM
            if trainer.should_stop:
                break
    if state.acc is None and state.restoring:
        # Resumed at the very end of an epoch's batches: no step has shown the metrics'
        # structure yet, so take it from the epoch's first batch.
        first = next(iter(batches_from(loader, 0, 1)))
        if decode is not None:
            first = decode(first)
        state.init(steps, trainer._dyn, trainer._placement.put_batch(prepare(first)))
    if state.steps_in_interval:
        trainer._close_train_interval()


class TrainAccumulators:
    """On-device metric accumulators of the current training epoch.

    They are part of a mid-epoch checkpoint (`state_dict` holds the flags, the arrays are
    saved by the checkpoint), so metrics after a resume are bit-identical too.
    """

    def __init__(self, true: jax.Array, false: jax.Array):
        self._true, self._false = true, false
        self.acc_flat = FlatTree()  # current log interval
        self.total_flat = FlatTree()  # whole epoch so far
        self.fresh_interval = True
        self.fresh_epoch = True
        self.steps_in_interval = 0
        self._restored: tuple[Any, Any] | None = None

    def init(self, steps, dyn, batch_spec) -> None:
        empty = steps.empty_accumulator("train", dyn, batch_spec)
        if self._restored is None:
            self.acc = empty
            self.total = jax.tree.map(jnp.copy, empty)
            return
        from ..checkpointing._tree import check_structure, from_storage, specs

        saved, stored = self._restored
        self._restored = None
        template = {"acc": empty, "total": empty}
        check_structure(
            saved,
            specs(template),
            source="training accumulators",
            template_name="the training metrics of this experiment",
        )
        restored = from_storage(template, saved, stored)
        self.acc, self.total = restored["acc"], restored["total"]

    @property
    def acc(self) -> PyTree:
        return self.acc_flat.tree

    @acc.setter
    def acc(self, tree: PyTree) -> None:
        self.acc_flat.tree = tree

    @property
    def total(self) -> PyTree:
        return self.total_flat.tree

    @total.setter
    def total(self, tree: PyTree) -> None:
        self.total_flat.tree = tree

    @property
    def restoring(self) -> bool:
        """Whether accumulators restored from a checkpoint wait for `init`."""
        return self._restored is not None

    def reset_flag(self) -> jax.Array:
        flag = self._true if self.fresh_interval else self._false
        self.fresh_interval = False
        return flag

    def epoch_flag(self) -> jax.Array:
        flag = self._true if self.fresh_epoch else self._false
        self.fresh_epoch = False
        return flag

    def new_epoch(self) -> None:
        self.fresh_interval = True
        self.fresh_epoch = True
        self.steps_in_interval = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "fresh_interval": self.fresh_interval,
            "fresh_epoch": self.fresh_epoch,
            "steps_in_interval": self.steps_in_interval,
        }

    def load_state_dict(self, state: dict[str, Any], saved: Any = None, stored: Any = None) -> None:
        """Restore the flags, and arrays (`saved` leaf specs, `stored` restored arrays) that
        replace the accumulators when the first batch shows their structure."""
        self.fresh_interval = bool(state["fresh_interval"])
        self.fresh_epoch = bool(state["fresh_epoch"])
        self.steps_in_interval = int(state["steps_in_interval"])
        self.acc = self.total = None
        self._restored = None if stored is None else (saved, stored)


class EvaluationInterrupted(Exception):
    """A SIGINT/SIGTERM arrived during a validation run inside `fit` (see `run_evaluation`)."""


def _eval_items(
    trainer: "Trainer", loader: Iterable, count: int | None, validate: Any, hooks_need_batches: bool
):
    """`(prefetched EvalBatch items, preparer, decode)` for an evaluation or predict run."""
    declared = getattr(loader, "batch_size", None)
    loader, decode = _split_transform(loader, hooks_need_batches)
    preparer = EvalPreparer(
        trainer._placement,
        honours_mask=type(trainer.experiment).honours_mask,
        validate=validate,
        batch_size=declared if isinstance(declared, int) else None,
    )
    # Copied as they arrive (as `put_batch` would): a loader may reuse its buffers for the
    # next batch, which `with_last` reads before the preparer places this one.
    batches = with_last(map(owned_copy, batches_from(loader, 0, count)))
    items = Prefetcher((preparer(item) for item in batches), depth=trainer.prefetch)
    return items, preparer, decode


def run_evaluation(
    trainer: "Trainer",
    stage: str,
    loader: Iterable,
    count: int | None,
    *,
    sanity_check: bool = False,
) -> dict[str, jax.Array]:
    """Evaluate every batch of `loader` and return the metrics on device.

    Every sample counts exactly once (see `_eval_input`). With `sanity_check=True` (the
    check before training) no hook is called and signals wait for the first step.

    Inside `fit`, a SIGINT/SIGTERM stops the run before its next batch and raises
    `EvaluationInterrupted`: a long validation must not delay the checkpoint that the
    signal asks for (a preempted job has seconds). Not with several processes: the others
    would go on with evaluation steps (collectives) and wait forever; there the signal acts
    after validation, as at any step boundary."""
    # `_signals` is set only while `fit` runs.
    interruptible = not (trainer._placement.multi_process or sanity_check)
    signals = trainer._signals if interruptible else None
    steps = trainer._steps
    hooks = not sanity_check
    batch_start = hooks and trainer._hooks.active(f"on_{stage}_batch_start")
    batch_end = hooks and trainer._hooks.active(f"on_{stage}_batch_end")
    items, preparer, decode = _eval_items(
        trainer, loader, count, trainer.experiment.validate_batch, batch_start or batch_end
    )
    acc = FlatTree()
    dyn = trainer._dyn_state
    reset = trainer._true
    inflight = InflightLimit()
    with items:
        for batch_idx, item in enumerate(items):
            if signals is not None and signals.received is not None:
                raise EvaluationInterrupted
            item = preparer.finish_last(item)
            batch = item.batch
            if acc.tree is None:
                spec = batch if decode is None else jax.eval_shape(decode, batch)
                acc.tree = steps.empty_accumulator("eval", trainer._dyn, spec)
            evaluate = steps.evaluate(
                dyn.treedef, acc.treedef, decode, stage=stage, short=item.short
            )
            if batch_start:
                trainer._hooks.call(trainer, f"on_{stage}_batch_start", batch, batch_idx)
                steps, dyn = trainer._steps, trainer._dyn_state  # a hook may replace them
                evaluate = steps.evaluate(
                    dyn.treedef, acc.treedef, decode, stage=stage, short=item.short
                )
            acc.leaves, step_metrics, ticket = evaluate(dyn.leaves, acc.leaves, batch, reset)
            inflight.add(ticket)
            reset = trainer._false
            if batch_end:
                trainer._hooks.call(
                    trainer,
                    f"on_{stage}_batch_end",
                    steps.metrics("eval", step_metrics),
                    batch,
                    batch_idx,
                )
                steps, dyn = trainer._steps, trainer._dyn_state
    if acc.tree is None:
        return {}
    return steps.compute("eval", acc.tree)


def run_predict(trainer: "Trainer", loader: Iterable, count: int | None) -> PyTree:
    """Predict every batch and return the outputs of exactly the real samples, in order, on
    the host."""
    hooks = trainer._hooks
    batch_start = hooks.active("on_predict_batch_start")
    batch_end = hooks.active("on_predict_batch_end")
    items, preparer, decode = _eval_items(trainer, loader, count, None, batch_start or batch_end)
    outputs, keeps = [], []
    inflight = InflightLimit()
    with items:
        for batch_idx, item in enumerate(items):
            item = preparer.finish_last(item)
            batch = item.batch
            if batch_start:
                hooks.call(trainer, "on_predict_batch_start", batch, batch_idx)
            out = trainer._steps.predict(trainer._dyn, batch, decode, short=item.short)
            inflight.add(out)
            outputs.append(out)
            keeps.append(item.keep)
            if batch_end:
                hooks.call(trainer, "on_predict_batch_end", out, batch, batch_idx)
    if not outputs:
        return None
    outputs = trainer._placement.to_host(outputs)
    kept = [
        jax.tree.map(lambda x, k=k: np.asarray(x) if k is None else np.asarray(x)[k], out)
        for out, k in zip(outputs, keeps)
    ]
    return jax.tree.map(lambda *xs: np.concatenate(xs, axis=0), *kept)
