"""What `fit` checks before its first step, so that mistakes surface in seconds.

- A sanity validation (`num_sanity_val_steps`) compiles and runs `eval_step` on a few
  validation batches before training: no hook, no log, no change to any state.
- Every metric a callback requires (`Callback.required_metrics`, e.g. a monitor) must be one
  a stage of the run produces: `val/*` names are checked after the sanity validation, the
  training ones at the first batch.
- A resumed run's batch size must be its checkpoint's (`check_settings`), at the first batch.
"""

from typing import TYPE_CHECKING

from jaxtyping import PyTree

from ..datamodules import DataModule, as_loader
from ._evaluation import num_batches, run_evaluation
from ._microbatches import require_optimizers
from ._resume import check_settings

if TYPE_CHECKING:
    from ._run import Run


def validation_loader(run: "Run", datamodule: DataModule):
    """The validation loader of the fit (with `overfit_batches`, the training loader), or
    `None` if this run never validates."""
    trainer, every = run.trainer, run.trainer.check_val_every_n_epoch
    if trainer.limit_val_batches == 0:
        return None
    if trainer.max_epochs is not None and every is not None and trainer.max_epochs < every:
        return None
    if trainer.overfit_batches:  # validation on the training batches it overfits
        datamodule.set_epoch(run.controls.data_epoch(run.progress.epoch))
        return as_loader(datamodule.train_dataloader())
    loader = datamodule.val_dataloader()
    return None if loader is None else as_loader(loader)


def _sanity_check(run: "Run", datamodule: DataModule) -> frozenset[str] | None:
    """Run the sanity validation; return the validation metrics' names (without `val/`), an
    empty set if this run never validates, or `None` if unknown (`num_sanity_val_steps=0`)."""
    loader = validation_loader(run, datamodule)
    if loader is None:
        return frozenset()
    trainer = run.trainer
    limit = num_batches(loader, trainer.limit_val_batches, "limit_val_batches")
    steps = trainer.num_sanity_val_steps
    if steps == 0:
        return None
    count = limit if steps == -1 else (steps if limit is None else min(steps, limit))
    return frozenset(run_evaluation(run, "validation", loader, count, sanity_check=True))


def preflight(run: "Run", datamodule: DataModule) -> None:
    """Before the first step: the sanity validation and the check of `val/*` names (and,
    with microbatches, that the experiment has a `solstice.Optimizer` to tap)."""
    if run.trainer.accumulate_grad_batches > 1:
        require_optimizers(run.experiment, run.trainer.accumulate_grad_batches)
    run.progress.stage = "sanity_check"
    try:
        run.val_metric_names = _sanity_check(run, datamodule)
    finally:
        run.progress.stage = "train"
    run.checked_first_batch = False
    check_required_metrics(run, None)


def at_first_batch(run: "Run", train_batch: PyTree) -> None:
    """Once per `fit`, at its first training batch (before the step runs)."""
    if run.checked_first_batch:
        return
    run.checked_first_batch = True
    check_required_metrics(run, run.steps.metric_names("train", run.dyn, train_batch))
    if run.resumed_from is not None:
        path, saved = run.resumed_from
        size = {"train_batch_size": saved.get("train_batch_size")}
        now = {"train_batch_size": run.train_batch_size}
        check_settings(size, now, path, mid_epoch=run.progress.batch_idx > 0)


def check_required_metrics(run: "Run", train_names: frozenset[str] | None) -> None:
    """Raise `ValueError` naming a required metric no stage produces. `None`: the training
    metrics are not known yet (only `val/*` names are checked); validation names that the
    sanity check could not know (`None`) are accepted."""
    val_names = run.val_metric_names
    produced = {name for cb in run.trainer.callbacks for name in cb.provided_metrics()}
    if train_names is not None:
        produced |= {f"train/{name}_epoch" for name in train_names}
    if val_names is not None:
        produced |= {f"val/{name}" for name in val_names}
    for cb in run.trainer.callbacks:
        missing = [
            key
            for key in cb.required_metrics()
            if key not in produced
            and (train_names is not None or key.startswith("val/"))
            and (val_names is not None or not key.startswith("val/"))
        ]
        if missing:
            raise _missing(type(cb).__name__, missing, produced, train_names, val_names)


def _missing(owner, missing, produced, train_names, val_names) -> ValueError:
    never = not val_names and any(k.startswith("val/") for k in missing)
    why = (
        " This run never validates (no validation split, `limit_val_batches=0` or "
        "`check_val_every_n_epoch` above `max_epochs`), so it has no `val/*` metrics."
        if never
        else ""
    )
    listing = ", ".join(f"`{k}`" for k in sorted(produced)) or "none"
    if train_names is None:
        listing += " (and the training metrics, as `train/<name>_epoch`)"
    return ValueError(
        f"`{owner}` monitors `{missing[0]}`, which no stage of this run produces.{why} "
        f"Metrics it can monitor: {listing}. Pass one of them as `monitor=`."
    )
