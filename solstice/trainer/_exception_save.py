"""Saving when `fit` raises: only a state a resume can continue from, or a warning why not.

An exception can come from anywhere in the loop: a hook, the data loader (through the
feeder), a step's tracing or its computation, a signal. The run's state is then whatever it
was at that instant, and only some instants are states a resume can continue from:

- the device state must exist: a step whose computation failed after its arrays were donated
  to it has deleted them;
- the host's record must describe it: the device's step counter and the host's global step
  agree (they do not between a fused call and the bookkeeping of its steps);
- a log interval the device has closed (or has to close) but the host has not published is
  settled: folded into the epoch's metrics, as publishing it would have done.
"""

import contextlib
import warnings
from collections.abc import Callable, Iterator

import jax

from ..checkpointing._saver import EXCEPTION, Saver
from ._run import Run

#: `fit`'s `save_moment(run, kinds, savers, time_due)`.
SaveMomentFn = Callable[[Run, tuple[str, ...], list[Saver], list[bool]], None]


def _device_arrays(run: Run) -> list[jax.Array]:
    acc = run.accumulators
    flats = (run.experiment_state, acc.acc_flat, acc.total_flat, run.in_step_state)
    return [*(x for flat in flats for x in (flat.leaves or [])), run.step_counter]


def unsavable(run: Run) -> str | None:
    """Why the run's state now is not one a resume can continue from, or `None`."""
    progress = run.progress
    if jax.process_count() > 1:
        return (
            f"with {jax.process_count()} processes a checkpoint is written by all of them "
            "together, and the exception reached this one"
        )
    if run.accumulators.restoring and progress.batch_idx > 0:
        source = run.resumed_from[0] if run.resumed_from else "its checkpoint"
        return f"the run resumed mid-epoch and took no step since; `{source}` holds this state"
    arrays = _device_arrays(run)
    if any(x.is_deleted() for x in arrays):
        return (
            "the exception came inside a training step's computation, after the run's arrays "
            "were handed (donated) to it, so they no longer exist"
        )
    try:
        jax.block_until_ready(arrays)
    except Exception as error:  # noqa: BLE001 - the reason itself
        return f"the device state could not be computed ({type(error).__name__}: {error})"
    on_device = int(run.step_counter)
    if on_device != progress.global_step:
        return (
            f"the exception came between a training call and the bookkeeping of its steps: "
            f"the device has taken {on_device} steps, the run's record says "
            f"{progress.global_step}"
        )
    return None


def settle_interval(run: Run) -> None:
    """Fold a log interval that ended at the current step but was not published into the
    epoch's metrics, and start a new one (its own metrics are not logged)."""
    acc, step = run.accumulators, run.progress.global_step
    if not (acc.ready and acc.steps_in_interval):
        return
    if not run.log_every.crossed(step - acc.steps_in_interval, step):
        return
    if not acc.interval_closed:
        _, acc.total_flat.tree = run.steps.close_interval(
            "train", acc.acc, acc.total, acc.epoch_flag()
        )
    acc.new_interval()


def save_on_exception(
    run: Run, savers: list[Saver], save_moment: SaveMomentFn, exception: BaseException
) -> None:
    """Ask the savers that save on exceptions to save the run's state (with `fit`'s
    `save_moment`), if a resume can continue from it; otherwise warn why no checkpoint was
    written. Never raises."""
    savers = [saver for saver in savers if saver.saves_on_exception]
    if not savers:
        return
    try:
        why = unsavable(run)
        if why is None:
            settle_interval(run)
            save_moment(run, (EXCEPTION,), savers, [False] * len(savers))
            return
    except Exception as error:  # noqa: BLE001 - reported; the run's own exception goes on
        why = f"capturing the state failed: {type(error).__name__}: {error}"
    warnings.warn(
        f"No checkpoint was written on the {type(exception).__name__} that ended `fit` at "
        f"global step {run.progress.global_step}: {why}. The last checkpoint of a "
        "`ModelCheckpoint`, if any, is the way back.",
        RuntimeWarning,
        stacklevel=4,
    )


@contextlib.contextmanager
def saving_on_exception(run: Run, savers: list[Saver], save_moment: SaveMomentFn) -> Iterator[None]:
    """While `fit` runs: if it raises, save (`save_on_exception`) before the exception goes
    on to the `on_exception` hooks."""
    try:
        yield
    except BaseException as exception:
        save_on_exception(run, savers, save_moment, exception)
        raise
