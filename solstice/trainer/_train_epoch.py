"""One training epoch: take the input, call the compiled step, advance, let components act.

Nothing here reads a device value back, except at log intervals (on the loggers' thread) and
with `detect_anomaly` (a debugging option).
"""

from typing import TYPE_CHECKING, Any

import jax
import numpy as np
from jaxtyping import PyTree

from ..datamodules import Loader
from ._feeder import InflightLimit
from ._preflight import at_first_batch
from ._run import ANOMALY
from ._step_cost import FirstTrainCall
from ._train_input import TrainInput, train_input

if TYPE_CHECKING:
    from ._run import Run


def _slice(tree: PyTree, i: int) -> PyTree:
    return jax.tree.map(lambda x: x[i], tree)


class TrainCaller:
    """Calls the compiled training functions on the run's flat state, and keeps it.

    The functions are looked up once per epoch and kind (single or fused, closing the log
    interval or not), and again only when a hook replaced the experiment with one of
    another structure.
    """

    def __init__(self, run: "Run", source: TrainInput):
        self.run = run
        self.source = source
        self._fns: dict[tuple[int, int, bool], Any] = {}
        self._steps = run.steps
        self._dyn_def = run.experiment_state.treedef

    def _fn(self, n: int, batch: PyTree, closing: bool) -> Any:
        run, source = self.run, self.source
        if run.steps is not self._steps or run.experiment_state.treedef is not self._dyn_def:
            # a hook replaced the experiment with one of another structure: its own steps
            self._steps, self._dyn_def = run.steps, run.experiment_state.treedef
            self._steps.prepare("train", run.dyn, source.spec(n, batch))
            self._fns.clear()
        m = source.loader_batches(n, batch) // n  # microbatches per optimizer step
        fn = self._fns.get((n, m, closing))
        if fn is None:
            defs = (self._dyn_def, run.accumulators.acc_flat.treedef, run.in_step_state.treedef)
            if source.accumulate > 1:
                fn = self._steps.train_accumulated(
                    defs,
                    n=n,
                    m=m,
                    accumulate=source.accumulate,
                    closing=closing,
                    decode=source.decode,
                    gather=source.gather,
                )
            elif n == 1:
                fn = self._steps.train(
                    defs, closing=closing, gather=source.gather, decode=source.decode
                )
            else:
                fn = self._steps.train_many(
                    defs, gather=source.gather, length=source.length, decode=source.decode
                )
            self._fns[(n, m, closing)] = fn
        return fn

    def __call__(self, n: int, batch: PyTree, closing: bool) -> tuple[PyTree, Any]:
        """Run `n` steps on `batch`; `(step metrics or None, packed interval or None)`.
        Single steps (and microbatched ones) close the log interval in the same call (one
        dispatch, not two); fused calls close it separately (`Run.close_interval`)."""
        run = self.run
        acc, carries = run.accumulators, run.in_step_state
        args = [
            run.experiment_state.leaves,
            acc.acc_flat.leaves,
            self.source.data(batch),
            acc.reset_flag(),
            carries.leaves,
            run.step_counter,
        ]
        close_inside = closing and (n == 1 or self.source.accumulate > 1)
        if n == 1 or self.source.accumulate > 1:
            args += (acc.total_flat.leaves, acc.epoch_flag()) if close_inside else (None, None)
        fn = self._fn(n, batch, close_inside)
        if run.first_train_call is None:  # (once per run: for `Trainer.train_step_cost`)
            single = lambda: self._fn(1, batch, False)  # noqa: E731
            gathered = self.source.gather is not None
            devices = run.placement.num_devices
            run.first_train_call = FirstTrainCall(n, args, fn, single, gathered, devices)
        out = fn(*args)
        run.experiment_state.leaves, acc.acc_flat.leaves, new_carries = out[:3]
        if new_carries is not None:
            carries.leaves = new_carries
        step_metrics, run.step_counter = out[3:5]
        packed = None
        if close_inside:
            packed, acc.total_flat.leaves = out[5:]
            acc.interval_closed = True
        acc.steps_in_interval += n
        return step_metrics, packed


def _first_batch(run: "Run", spec: PyTree) -> None:
    """Before the first step of the epoch: the batch size, the accumulators, the checks."""
    if run.train_batch_size is None:  # the global size, from shapes only
        run.train_batch_size = jax.tree.leaves(spec)[0].shape[0]
    if not run.accumulators.ready:
        run.accumulators.init(run.steps.empty_accumulator("train", run.dyn, spec))
    at_first_batch(run, spec)


def _advance(
    run: "Run", source: TrainInput, n: int, step_metrics: PyTree, batch: PyTree, hooks: bool
) -> None:
    """Count `n` steps done; with per-batch end hooks, one loader batch at a time, each hook
    seeing the position after its own batch (the global step advances with the last
    microbatch of each optimizer step, as in Lightning)."""
    progress = run.progress
    rows = source.loader_batches(n, batch)
    if not hooks:
        progress.global_step += n
        progress.batch_idx += rows
        return
    for i in range(rows):
        progress.global_step += (i + 1) % (rows // n) == 0
        progress.batch_idx += 1
        run.hooks.call(
            "on_train_batch_end",
            run.steps.metrics("train", source.loader_batch(n, step_metrics, i)),
            source.loader_batch(n, batch, i),
            progress.batch_idx - 1,
        )


def run_train_epoch(run: "Run", loader: Loader, count: int | None, boundary: Any) -> None:
    """Run (the rest of) one training epoch; stop early on a stop or `max_steps`.
    `boundary(n)` is called after every compiled call of `n` steps (checkpoints, signals,
    validation within the epoch)."""
    trainer, progress, hooks = run.trainer, run.progress, run.hooks
    if trainer.max_steps is not None:  # (in loader batches: K per optimizer step)
        steps_left = max(0, trainer.max_steps - progress.global_step)
        remaining = progress.batch_idx + steps_left * trainer.accumulate_grad_batches
        count = remaining if count is None else min(count, remaining)
    batch_start, batch_end = (hooks.active(f"on_train_batch_{e}") for e in ("start", "end"))
    needs_batches = batch_start or batch_end or trainer.detect_anomaly
    inflight, log_every = InflightLimit(), run.log_every
    first = not run.accumulators.ready or run.train_batch_size is None
    with train_input(run, loader, count, needs_batches) as source:
        call = TrainCaller(run, source)
        for n, batch in source.items:
            if first:
                _first_batch(run, source.spec(n, batch))
                first = False
            for i in range(source.loader_batches(n, batch)) if batch_start else ():
                one = source.loader_batch(n, batch, i)
                hooks.call("on_train_batch_start", one, progress.batch_idx + i)
            step = progress.global_step
            closing = log_every.crossed(step, step + n)
            step_metrics, packed = call(n, batch, closing)
            inflight.add(run.step_counter)
            if needs_batches:  # (the per-batch work: `detect_anomaly`, per-batch end hooks)
                if trainer.detect_anomaly:
                    check_anomaly(run, batch, n, step)
                _advance(run, source, n, step_metrics, batch, batch_end)
            else:
                progress.global_step = step + n
                progress.batch_idx += source.loader_batches(n, batch)
            if packed is not None:  # the step closed the log interval on the device as well
                run.publish_interval(packed)
            elif closing:
                run.close_interval()
            boundary(n)  # step-triggered checkpoints, SIGINT/SIGTERM, validation
            if run.should_stop and run.controls.stop_due(run):
                break
    if run.accumulators.restoring:
        # Resumed at the very end of an epoch's batches: no step has shown the metrics'
        # structure yet, so take it from the epoch's first batch.
        first = next(iter(loader))  # its shapes only
        run.accumulators.init(run.steps.empty_accumulator("train", run.dyn, first))
    if run.accumulators.steps_in_interval and not run.interrupted:  # (else: checkpointed)
        run.close_interval()


def check_anomaly(run: "Run", batch: PyTree, n: int, first_step: int) -> None:
    """`detect_anomaly`: after a call of `n` steps that began after global step
    `first_step`, raise at the first step whose batch or metrics were not finite."""
    bad = int(run.in_step_value(ANOMALY))  # the one read per call this debugging option costs
    if bad < 0:
        return
    rows = jax.tree.leaves(batch)[0].shape[0] // n if run.trainer.accumulate_grad_batches > 1 else 0
    index = bad - first_step - 1
    if rows:  # the microbatches of the bad optimizer step
        one = jax.tree.map(lambda x: x[index * rows : (index + 1) * rows], batch)
    else:
        one = batch if n == 1 else _slice(batch, index)
    host = jax.device_get(one)
    leaves = [
        f"`batch{jax.tree_util.keystr(path)}`"
        for path, x in jax.tree_util.tree_leaves_with_path(host)
        if np.issubdtype(np.asarray(x).dtype, np.inexact) and not np.isfinite(x).all()
    ]
    where = f"training step {bad} (epoch {run.progress.epoch}, counting steps from 1)"
    if leaves:
        raise FloatingPointError(
            f"detect_anomaly: the input of {where} is not finite: {', '.join(leaves)} holds "
            "NaN or inf. Clean the data (or the DataModule's transform) that produces it."
        )
    raise FloatingPointError(
        f"detect_anomaly: the metrics (the loss) of {where} are not finite, with finite "
        "inputs: the step itself produced NaN or inf (a learning rate too high, a log or "
        "division of 0, an overflow in low precision...)."
    )
