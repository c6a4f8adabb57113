"""Evaluation and predict runs: every batch of a split through the compiled step, every
sample counted exactly once (see `_eval_input`), nothing read back but the final metrics."""

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import equinox as eqx
import jax
import numpy as np
from jaxtyping import PyTree

from .._experiment import Experiment
from ..callbacks import Callback
from ..checkpointing._checkpoint_state import read_in_step
from ..checkpointing._export import load
from ..checkpointing._format import open_checkpoint
from ..datamodules import DataModule, Loader, as_loader
from ._eval_input import EvalPreparer, with_last
from ._feeder import InflightLimit, Prefetcher
from ._flat import FlatTree
from ._placement import owned_copy
from ._run import Run, running, start_run
from ._train_input import batches_from

if TYPE_CHECKING:
    from ._trainer import Trainer


class EvaluationInterrupted(Exception):
    """A SIGINT/SIGTERM arrived during a validation run inside `fit`."""


def num_batches(loader: Loader, limit: int | float | None, what: str) -> int | None:
    """How many batches to take from `loader` given a `limit_*_batches` setting."""
    length = loader.num_batches()
    if limit is None:
        return length
    if isinstance(limit, float):
        if length is None:
            raise ValueError(
                f"`{what}={limit}` is a fraction, but the dataloader's length is unknown. Pass "
                "an int number of batches instead (or a `solstice.datamodules.Loader` that "
                "implements `num_batches`)."
            )
        return max(1, int(length * limit)) if length else 0
    return limit if length is None else min(limit, length)


def evaluation_state(run: Run) -> FlatTree:
    """The arrays evaluation and predict runs use: the experiment's, or those of the
    experiment the callbacks ask for instead (`Callback.evaluation_experiment`, in order,
    each given the previous one's), placed as the experiment's."""
    callbacks = [
        cb
        for cb in run.trainer.callbacks
        if type(cb).evaluation_experiment is not Callback.evaluation_experiment
    ]
    if not callbacks:
        return run.experiment_state
    original = experiment = run.experiment
    for cb in callbacks:
        replacement = cb.evaluation_experiment(run.trainer, experiment)
        if replacement is not None:
            experiment = _checked_replacement(replacement, original, type(cb).__name__)
    if experiment is original:
        return run.experiment_state
    return FlatTree(run.place(eqx.filter(experiment, eqx.is_array), copy=False))


def _checked_replacement(new: Any, original: Experiment, by: str) -> Experiment:
    name = f"`{by}.evaluation_experiment`"
    if not isinstance(new, Experiment):
        raise TypeError(
            f"{name} returned a `{type(new).__name__}`; it must return a `solstice.Experiment` "
            "like the one it was given (other array values only), or `None`."
        )
    same = eqx.tree_equal(
        eqx.filter(new, eqx.is_array, inverse=True),
        eqx.filter(original, eqx.is_array, inverse=True),
    )
    shapes = [(x.shape, x.dtype) for x in jax.tree.leaves(eqx.filter(new, eqx.is_array))]
    before = [(x.shape, x.dtype) for x in jax.tree.leaves(eqx.filter(original, eqx.is_array))]
    if not same or shapes != before:
        raise ValueError(
            f"{name} returned an experiment whose structure, non-array fields or array "
            "shapes and dtypes differ from the one it was given; it may only change array "
            "values (e.g. swap averaged weights in with `eqx.combine`)."
        )
    return new


def _eval_items(run: "Run", loader: Loader, count: int | None, validate: Any, keep_host: bool):
    """`(prefetched EvalBatch items, preparer, decode)` for an evaluation or predict run."""
    split = None if keep_host else loader.split_transform()
    source, decode = (loader, None) if split is None else split
    preparer = EvalPreparer(
        run.placement,
        honours_mask=bool(run.experiment.honours_mask),
        validate=validate,
        batch_size=loader.batch_size,
    )
    # Copied as they arrive (as `put_batch` would): a loader may reuse its buffers for the
    # next batch, which `with_last` reads before the preparer places this one.
    batches = with_last(map(owned_copy, batches_from(source, 0, count)))
    items = Prefetcher((preparer(item) for item in batches), depth=run.trainer.prefetch)
    return items, preparer, decode


def run_evaluation(
    run: "Run", stage: str, loader: Loader, count: int | None, *, sanity_check: bool = False
) -> dict[str, jax.Array]:
    """Evaluate every batch of `loader`; return the metrics, on the device. With
    `sanity_check=True` (before training) no hook is called and signals wait.

    Inside `fit`, a SIGINT/SIGTERM stops the run before its next batch (`EvaluationInterrupted`):
    a long validation must not delay the checkpoint a preempted job has seconds for. Not with
    several processes: the others would wait in the step's collectives forever; there the
    signal acts after validation, as at any step boundary."""
    interruptible = not (run.placement.multi_process or sanity_check)
    signals = run.signals if interruptible else None
    hooks = run.hooks
    start = not sanity_check and hooks.active(f"on_{stage}_batch_start")
    end = not sanity_check and hooks.active(f"on_{stage}_batch_end")
    items, preparer, decode = _eval_items(
        run, loader, count, run.experiment.validate_batch, start or end
    )
    state = evaluation_state(run)
    acc, reset, inflight = FlatTree(), run.true, InflightLimit()
    with items:
        for batch_idx, item in enumerate(items):
            if signals is not None and signals.received is not None:
                raise EvaluationInterrupted
            item = preparer.finish_last(item)
            if acc.tree is None:
                spec = item.batch if decode is None else jax.eval_shape(decode, item.batch)
                acc.tree = run.steps.empty_accumulator("eval", state.tree, spec)
            if start:
                hooks.call(f"on_{stage}_batch_start", item.batch, batch_idx)
            if "eval" not in run.steps.layouts:  # a hook replaced the experiment's structure
                run.steps.prepare("eval", state.tree, spec)
            defs = (state.treedef, acc.treedef)
            evaluate = run.steps.evaluate(defs, decode, stage=stage, short=item.short)
            acc.leaves, metrics, ticket = evaluate(state.leaves, acc.leaves, item.batch, reset)
            inflight.add(ticket)
            reset = run.false
            if end:
                hooks.call(
                    f"on_{stage}_batch_end",
                    run.steps.metrics("eval", metrics),
                    item.batch,
                    batch_idx,
                )
    return {} if acc.tree is None else run.steps.compute("eval", acc.tree)


def run_predict(run: "Run", loader: Loader, count: int | None) -> PyTree:
    """Predict every batch; return the outputs of exactly the real samples, in order, on the
    host."""
    hooks = run.hooks
    start, end = (hooks.active(f"on_predict_batch_{e}") for e in ("start", "end"))
    items, preparer, decode = _eval_items(run, loader, count, None, start or end)
    dyn = evaluation_state(run).tree
    outputs, keeps, inflight = [], [], InflightLimit()
    with items:
        for batch_idx, item in enumerate(items):
            item = preparer.finish_last(item)
            if start:
                hooks.call("on_predict_batch_start", item.batch, batch_idx)
            out = run.steps.predict(dyn, item.batch, decode, short=item.short)
            inflight.add(out)
            outputs.append(out)
            keeps.append(item.keep)
            if end:
                hooks.call("on_predict_batch_end", out, item.batch, batch_idx)
    if not outputs:
        return None
    outputs = run.placement.to_host(outputs)
    kept = [
        jax.tree.map(lambda x, k=k: np.asarray(x) if k is None else np.asarray(x)[k], out)
        for out, k in zip(outputs, keeps)
    ]
    return jax.tree.map(lambda *xs: np.concatenate(xs, axis=0), *kept)


def evaluate_stage(run: "Run", stage: str, loader: Loader, limit: Any) -> dict[str, float]:
    """One evaluation run with its hooks: `{"val/<metric>": value}` (or `test/`), published
    and in `callback_metrics`."""
    prefix = "val" if stage == "validation" else stage
    count = num_batches(loader, limit, f"limit_{prefix}_batches")
    run.hooks.call(f"on_{stage}_start")
    run.hooks.call(f"on_{stage}_epoch_start")
    computed = run_evaluation(run, stage, loader, count)
    metrics = {f"{prefix}/{k}": v for k, v in computed.items()}
    host = run.trainer._update_callback_metrics(metrics) if metrics else {}
    if metrics:
        run.publish(metrics, run.progress.global_step)
    run.hooks.call(f"on_{stage}_epoch_end")
    run.hooks.call(f"on_{stage}_end")
    return host


# ---------------------------------------------------------------------- the Trainer's entry
def loader_of(datamodule: DataModule, stage: str) -> Loader:
    """The datamodule's loader for an evaluation or predict `stage` (`ValueError` if none)."""
    split = {"validation": "val", "test": "test", "predict": "predict"}[stage]
    loader = getattr(datamodule, f"{split}_dataloader")()
    if loader is None:
        raise ValueError(
            f"`{type(datamodule).__name__}.{split}_dataloader()` returned None, so there is "
            f"nothing to {stage}. Give the datamodule a {split} split."
        )
    return as_loader(loader)


def for_evaluation(
    trainer: "Trainer", experiment: Any, datamodule: Any, ckpt_path: Any, method: str
) -> tuple[Any, DataModule, tuple[dict, PyTree] | None]:
    """The experiment and datamodule `validate`/`test`/`predict` work on: the given ones, or
    those of the last `fit`; with `ckpt_path`, the checkpoint's arrays in that experiment.
    Third, the in-step reductions and states that go with that experiment (see
    `in_step_of`)."""
    if datamodule is None:
        datamodule = trainer.datamodule
        if datamodule is None:
            raise ValueError(
                f"`trainer.{method}()` needs a datamodule: pass one (`trainer.{method}"
                "(experiment, datamodule)`), or call `fit` first to use its datamodule."
            )
    if experiment is None:
        experiment = trainer._fitted
        if experiment is None:
            raise ValueError(
                f"`trainer.{method}()` has no experiment: pass one (`trainer.{method}"
                "(experiment, datamodule)`), or call `fit` first; without one it uses the "
                "experiment `fit` returned (with `ckpt_path=`, as the template the checkpoint "
                "is loaded into)."
            )
    elif trainer._fit_input is not None and experiment is trainer._fit_input():
        warnings.warn(
            f"`trainer.{method}` was given the experiment that was passed to `fit`, which is "
            "untrained: `fit` never changes its argument, it returns the trained experiment. "
            f"Use `experiment = trainer.fit(...)`, or call `trainer.{method}()` without an "
            "experiment to use the fitted one.",
            UserWarning,
            stacklevel=4,
        )
    if ckpt_path is not None:
        path = trainer.find_checkpoint(ckpt_path, method)
        experiment = load(path, like=experiment)
        return experiment, datamodule, in_step_of(trainer, experiment, path)
    return experiment, datamodule, in_step_of(trainer, experiment, None)


def in_step_of(trainer: "Trainer", experiment: Any, path: str | None) -> tuple[dict, Any] | None:
    """The in-step reductions and states of the run `experiment` comes from: those of the
    checkpoint at `path`, or, for the experiment the last `fit` returned, that fit's final
    ones; `None` for any other experiment (it is evaluated as it is)."""
    if path is None:
        fitted = trainer._fitted_in_step
        return fitted if fitted is not None and experiment is trainer._fitted else None
    in_steps = Run.in_steps_of(trainer)
    if not in_steps:
        return None
    templates = jax.eval_shape(lambda: {k: s.init(experiment) for k, s in in_steps.items()})
    document = open_checkpoint(path, hint="")
    states = read_in_step(Path(path), document, templates, trainer._placement.replicated)
    return None if states is None else (in_steps, states)


def evaluate(
    trainer: "Trainer", stage: str, experiment: Any, datamodule: Any, ckpt_path: Any
) -> dict[str, float]:
    """`Trainer.validate` / `Trainer.test`: one evaluation run of the stage's split."""
    method = "validate" if stage == "validation" else stage
    experiment, datamodule, in_step = for_evaluation(
        trainer, experiment, datamodule, ckpt_path, method
    )
    run = start_run(trainer, experiment, datamodule, stage, method)
    if in_step is not None:
        run.adopt_in_step(*in_step)
    loader = loader_of(datamodule, stage)
    limit = trainer.limit_val_batches if stage == "validation" else trainer.limit_test_batches
    with running(run, stage):
        return evaluate_stage(run, stage, loader, limit)


def predict(trainer: "Trainer", experiment: Any, datamodule: Any, ckpt_path: Any) -> PyTree:
    """`Trainer.predict`: one predict run."""
    experiment, datamodule, in_step = for_evaluation(
        trainer, experiment, datamodule, ckpt_path, "predict"
    )
    run = start_run(trainer, experiment, datamodule, "predict", "predict")
    if in_step is not None:
        run.adopt_in_step(*in_step)
    loader = loader_of(datamodule, "predict")
    count = num_batches(loader, trainer.limit_predict_batches, "limit_predict_batches")
    with running(run, "predict"):
        run.hooks.call("on_predict_start")
        run.hooks.call("on_predict_epoch_start")
        outputs = run_predict(run, loader, count)
        run.hooks.call("on_predict_epoch_end")
        run.hooks.call("on_predict_end")
    return outputs
