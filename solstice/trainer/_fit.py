"""The fit loop, top to bottom: epochs of training, validation at their ends (or every
`val_check_interval`), and the moments at which savers act and signals are obeyed.

```
fit
  preflight (sanity validation, checks)            on_fit_start, on_train_start
  for each epoch until a limit, a stop (after min_epochs/min_steps) or max_time:
    on_train_epoch_start
    run_train_epoch: for each call of the compiled step
        step boundary: signals, max_time (agreed between processes), or a validation of
          `val_check_interval` and its save moment, or step and time saves
    epoch metrics published, validation (without `val_check_interval`)
                                                  on_train_epoch_end
    epoch moment: epoch saves
  on_train_end, on_fit_end
```
"""

import logging
import os
import signal
import weakref
from pathlib import Path
from typing import TYPE_CHECKING

import jax
import numpy as np

from .._experiment import Experiment
from ..checkpointing._format import HISTORY_FILE
from ..checkpointing._saver import EPOCH, INTERRUPT, STEP, VALIDATION, SaveMoment, Saver
from ..datamodules import DataModule, as_loader
from ._agreement import Agreement
from ._arguments import check_stopping
from ._evaluation import EvaluationInterrupted, evaluate_stage, num_batches
from ._exception_save import saving_on_exception
from ._preflight import preflight, validation_loader
from ._resume import resolve, resume
from ._run import Run, running, start_run
from ._signals import SignalWatch
from ._train_epoch import run_train_epoch

if TYPE_CHECKING:
    from ._trainer import Trainer

log = logging.getLogger("solstice")


def savers_of(run: Run) -> list[Saver]:
    return [cb for cb in run.trainer.callbacks if isinstance(cb, Saver)]


def save_moment(
    run: Run, kinds: tuple[str, ...], savers: list[Saver], time_due: list[bool]
) -> None:
    """Ask every saver whether it saves at this moment (for each, the `kinds` in turn until
    one says yes; each decides and updates its books), then capture the run's state once,
    so that every checkpoint of the moment holds every saver's books after all of its
    decisions, and hand it to those that save."""
    plans: list[tuple[Saver, object]] = []
    taken: set[Path] = set()
    for saver, due in zip(savers, time_due, strict=True):
        for kind in kinds:
            plan = saver.plan(SaveMoment(kind, due), run.trainer, taken)
            if plan is not None:
                plans.append((saver, plan))
                taken.add(saver.planned_path(plan))
                break
    if plans:
        state = run.checkpoint_state()
        for saver, plan in plans:
            saver.write(plan, state)


def _received(run: Run) -> int:
    """The signal this process received and has not acted on yet (0: none)."""
    signals = run.signals
    return 0 if signals is None or signals.received is None else int(signals.received)


def step_boundary(run: Run, savers: list[Saver], n: int) -> None:
    """After every compiled training call (of `n` steps): signals, `max_time`, validation
    (`val_check_interval`) and step- and time-triggered saves, decided at agreement points
    (every boundary with one process; with several, steps every process picks alike, see
    `Agreement`)."""
    step, controls = run.progress.global_step, run.controls
    if not savers and not run.agreement.multi_process and not controls.active:
        if run.signals.received is not None:  # (the common case: nothing else to decide)
            stop_for_signal(run, int(run.signals.received), savers, [])
        return
    signum, due, clocks = 0, [False] * len(savers), [False, False]
    if run.agreement.due(step):
        mine = [saver.time_due() for saver in savers] + controls.clock_views()
        signum, agreed = run.agreement.agree(step, _received(run), mine)
        due, clocks = agreed[: len(savers)], agreed[len(savers) :]
    validate = controls.validation_due(run.progress, n, clocks[0])
    if signum or clocks[1]:
        run.progress.validation_pending = validate  # a resume runs it first
        if signum:
            stop_for_signal(run, signum, savers, due)
        else:
            stop_for_time(run, savers, due)
    elif validate:
        validate_within_epoch(run, savers, due)
    else:
        save_moment(run, (STEP,), savers, due)


def validate_within_epoch(run: Run, savers: list[Saver], due: list[bool] | None) -> None:
    """A validation of `val_check_interval` (or the one a signal interrupted, on resume),
    then its save moment (top-k checkpoints ranked by it; step saves of this boundary)."""
    progress, runs = run.progress, run.progress.validation_runs
    progress.validation_pending = True
    assert run.datamodule is not None  # (set by `start_run`)
    if not _validate(run, run.datamodule):
        stop_for_signal(run, _received(run), savers)
        return
    progress.validation_pending = False
    validated = progress.validation_runs > runs  # (not without a validation split)
    kinds = (VALIDATION, STEP) if validated else (STEP,)
    save_moment(run, kinds, savers, due or [False] * len(savers))


def _interrupt_save(run: Run, savers: list[Saver], due: list[bool] | None) -> None:
    """Every saver writes (this boundary's step and time saves, or else an interrupt save:
    one moment), then the loggers are flushed."""
    if due is None:  # between epochs
        save_moment(run, (INTERRUPT,), savers, [False] * len(savers))
    else:
        save_moment(run, (STEP, INTERRUPT), savers, due)
    for saver in savers:
        saver.wait()
    run.trainer._logging.flush()


def stop_for_time(run: Run, savers: list[Saver], due: list[bool] | None = None) -> None:
    """`max_time` has passed (agreed by every process): save and flush as a signal would,
    and end the fit normally; a resume continues it."""
    p = run.progress
    log.warning(
        "max_time=%s reached: stopping at global step %d (epoch %d, batch %d).",
        run.controls.max_time,
        p.global_step,
        p.epoch,
        p.batch_idx,
    )
    reason = f"`max_time={run.controls.max_time}` reached (a resume continues the run)."
    run.stop(reason, "max_time", final=False)
    _interrupt_save(run, savers, due)


def stop_for_signal(
    run: Run, signum: int, savers: list[Saver], due: list[bool] | None = None
) -> None:
    """Save, flush and end as signal `signum` would have (received by this process, or, with
    several processes, by another: all stop together)."""
    name = signal.Signals(signum).name
    p = run.progress
    log.warning(
        "%s received: stopping at global step %d (epoch %d, batch %d).",
        name,
        p.global_step,
        p.epoch,
        p.batch_idx,
    )
    run.stop(
        f"{name} received: the run was interrupted (a resume continues it).", name, final=False
    )
    _interrupt_save(run, savers, due)
    run.signals.finish(signum)  # raises, unless a previous Python handler chose otherwise


def _agreed_stop(run: Run) -> tuple[int, bool]:
    """Between epochs: the signal to act on and whether `max_time` has passed, agreed by
    every process."""
    time_up = run.controls.clock_views()[1]
    signum, agreed = run.agreement.agree(run.progress.global_step, _received(run), [time_up])
    return signum, agreed[0]


def fit_done(run: Run) -> bool:
    trainer, p = run.trainer, run.progress
    return (
        run.controls.stop_due(run)
        or (trainer.max_epochs is not None and p.epoch >= trainer.max_epochs)
        or (trainer.max_steps is not None and p.global_step >= trainer.max_steps)
    )


def run_fit(run: Run, datamodule: DataModule) -> None:
    """Train until `max_epochs`/`max_steps`, a stop or `max_time`."""
    savers = savers_of(run)
    with SignalWatch() as run.signals:
        run.agreement = Agreement(run.placement, run.progress.global_step)
        try:
            if not fit_done(run):
                preflight(run, datamodule)
            run.controls.start(run.progress.global_step)
            run.hooks.call("on_fit_start")
            run.hooks.call("on_train_start")
            while not fit_done(run):
                signum, time_up = _agreed_stop(run)
                if signum:
                    stop_for_signal(run, signum, savers)
                elif time_up:
                    stop_for_time(run, savers)
                else:
                    train_epoch(run, datamodule, savers)
            signum, _ = _agreed_stop(run)
            if signum:
                stop_for_signal(run, signum, savers)
            run.hooks.call("on_train_end")
            run.hooks.call("on_fit_end")
        finally:
            run.signals, run.agreement = None, None


def train_epoch(run: Run, datamodule: DataModule, savers: list[Saver]) -> None:
    """One epoch (or what is left of it): its batches, its metrics, validation, its end."""
    progress, trainer = run.progress, run.trainer
    datamodule.set_epoch(run.controls.data_epoch(progress.epoch))
    loader = as_loader(datamodule.train_dataloader())
    count = num_batches(loader, trainer.limit_train_batches, "limit_train_batches")
    name = type(datamodule).__name__
    if count == 0:
        raise ValueError(
            f"The training dataloader of `{name}` yields no batches (epoch {progress.epoch}). "
            "Check the training split is not empty and is at least one batch long."
        )
    run.num_training_batches = count
    run.controls.epoch_start(count)
    if progress.batch_idx == 0:
        run.accumulators.new_epoch()
    run.hooks.call("on_train_epoch_start")
    if progress.validation_pending:  # resumed where a signal interrupted a validation
        validate_within_epoch(run, savers, None)
    steps_before = progress.global_step
    if not run.interrupted:
        run_train_epoch(run, loader, count, lambda n: step_boundary(run, savers, n))
    if run.interrupted:  # a signal whose handler returned, or `max_time`: saved as it is
        return
    if progress.global_step == steps_before and progress.batch_idx == 0:
        raise ValueError(
            f"The training dataloader of `{name}` yielded no batches in epoch "
            f"{progress.epoch}; an empty training split cannot be fitted."
        )
    _publish_epoch(run)
    if run.controls.validates_at_epoch_end(progress.epoch):
        if not _validate(run, datamodule):
            # A signal stopped validation: the epoch stays open (all its batches done), so
            # the checkpoint the signal takes reruns validation when resumed.
            return
    run.epoch_done = True  # a checkpoint taken now resumes at the next epoch
    run.hooks.call("on_train_epoch_end")
    save_moment(run, (EPOCH,), savers, [False] * len(savers))
    progress.epoch += 1
    progress.batch_idx = 0
    progress.epoch_logged = False
    run.epoch_done = False
    run.accumulators.new_epoch()


def _publish_epoch(run: Run) -> None:
    """The epoch's training metrics (`train/<name>_epoch`), once (a run resumed in this
    epoch's validation has published them already)."""
    progress = run.progress
    if progress.epoch_logged:
        return
    computed = run.steps.compute("train", run.accumulators.total)
    metrics = {f"train/{k}_epoch": v for k, v in computed.items()}
    run.publish(metrics, progress.global_step)
    run.trainer._update_callback_metrics(metrics)
    progress.epoch_logged = True


def _validate(run: Run, datamodule: DataModule) -> bool:
    """Run a validation of the fit; `False` if a signal interrupted it."""
    loader = validation_loader(run, datamodule)
    if loader is None:
        return True
    run.progress.stage = "validation"
    try:
        evaluate_stage(run, "validation", loader, run.trainer.limit_val_batches)
    except EvaluationInterrupted:
        return False
    finally:
        run.progress.stage = "train"
    run.progress.validation_runs += 1
    run.controls.validated(run.progress.global_step)
    return True


def fit(
    trainer: "Trainer",
    experiment: Experiment,
    datamodule: DataModule,
    ckpt_path: str | os.PathLike | None,
    continue_stopped: bool,
) -> Experiment:
    """`Trainer.fit`: a new run, resumed from `ckpt_path` if given, trained to the end."""
    check_stopping(trainer.max_epochs, trainer.max_steps)
    if trainer._fit_input is not None and trainer.global_step > 0:
        raise RuntimeError(
            f"This Trainer has already run `fit` (to global step {trainer.global_step}): a "
            "Trainer runs one fit, and its callbacks, history and progress belong to that "
            "run. For a new run, create a new `Trainer`; to train on, create one with a "
            "larger `max_epochs`/`max_steps` and pass `ckpt_path='last'`."
        )
    run = start_run(trainer, experiment, datamodule, "train", "fit")
    trainer._fit_input = weakref.ref(experiment)
    savers = savers_of(run)
    found = None if ckpt_path is None else resolve(savers, ckpt_path)
    if found is not None:
        resume(run, *found, continue_stopped)
    if savers and not trainer.fast_dev_run:  # beside the checkpoints that count its records
        path = os.path.join(savers[0].dirpath, HISTORY_FILE)
        trainer.history.persist_to(path, write=jax.process_index() == 0)
    replicated = run.placement.replicated
    run.step_counter = jax.device_put(np.int32(run.progress.global_step), replicated)
    with running(run, "train"), saving_on_exception(run, savers, save_moment):
        run_fit(run, datamodule)
    trainer._fitted = run.experiment
    trainer._fitted_in_step = (run.in_steps, run.in_step_state.tree)
    return trainer._fitted
