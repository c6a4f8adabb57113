"""Resuming: a run rebuilt from a checkpoint (`CheckpointState.read`), checked first.

A checkpoint is taken at a step boundary or at the end of an epoch (recording the start of the
next), so a resumed run takes exactly the steps, hooks and metric updates the uninterrupted
run would have taken. Before that, what would make the resumed run another run is named:
other settings (`check_settings`), and a run that had stopped stays stopped unless asked.
"""

import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax

from ..checkpointing._checkpoint_state import CheckpointState
from ..checkpointing._format import CheckpointError, open_checkpoint
from ..checkpointing._remote import materialize
from ..checkpointing._saver import Saver
from ..storage._paths import check_path, is_remote
from ._hooks import callback_keys
from ._placement import Placement
from ._run import Run, run_settings

log = logging.getLogger("solstice")

# Settings that change where and how the steps compute, not what they compute: the global
# batches and their order depend on none of them (see `check_settings`).
_TOPOLOGY = {
    "devices": "each batch is split over another number of devices",
    "processes": "each process feeds another share of every global batch",
    "mesh": "the devices form another mesh",
    "sharding": "the experiment's arrays are split another way (`sharding_rules`)",
    "steps_per_execution": "the steps are fused into other compiled calls",
}
TOPOLOGY_HOLDS = (
    "the same global batches in the same order, so the run continues where it stopped; "
    "results allclose to the uninterrupted run (float reductions are summed in another "
    "order), not bit-identical"
)

# What a changed setting means for the resumed run (see `check_settings`).
_CONSEQUENCES = {
    "seed": "the seed keys the Trainer's randomness (on-device augmentation): the resumed run "
    "is not the run that was interrupted",
    "accumulate_grad_batches": "each optimizer step averages another number of batches, and "
    "schedules counted in steps advance at another pace: the resumed run is not the run that "
    "was interrupted",
    "datamodule": "another DataModule gives other batches: the resumed run is not the run "
    "that was interrupted",
    "precision": "the steps compute in another precision: the resumed run is not the run "
    "that was interrupted",
    "train_batch_size": "other batches, and schedules counted in steps advance at another "
    "pace: the resumed run is not the run that was interrupted",
}


def check_settings(
    saved: dict[str, Any], now: dict[str, Any], source: Any, *, mid_epoch: bool
) -> None:
    """Warn naming every setting that differs from the checkpoint's, with what it means;
    raise `ValueError` where an exact resume is impossible (another batch size mid-epoch:
    the position in the epoch counts batches). Settings unknown on either side are skipped.

    Another topology (devices, processes, mesh, sharding of the experiment, fused steps) is
    one warning saying what holds (`TOPOLOGY_HOLDS`); other settings, which make the resumed
    run another run, are another."""
    differences = []
    for key, consequence in _CONSEQUENCES.items():
        old, new = saved.get(key), now.get(key)
        if old is None or new is None or old == new:
            continue
        if key == "train_batch_size" and mid_epoch:
            raise ValueError(
                f"`{source}` was taken mid-epoch with a global batch size of {old}; this run's "
                f"is {new}. The position it records counts batches of {old}, so an exact "
                f"resume is impossible. Resume with batch size {old}, or from a checkpoint "
                "taken at the end of an epoch."
            )
        if key == "accumulate_grad_batches" and mid_epoch:
            raise ValueError(
                f"`{source}` was taken mid-epoch with `accumulate_grad_batches={old}`; this "
                f"run has {new}. The rest of the epoch would group its batches into other "
                f"optimizer steps, so an exact resume is impossible. Resume with "
                f"`accumulate_grad_batches={old}`, or from a checkpoint taken at the end of an "
                "epoch."
            )
        differences.append(f"`{key}` {old} in the checkpoint, {new} now: {consequence}")
    if differences:
        warnings.warn(
            f"Resuming from `{source}` with other settings than it was written with. "
            + "; ".join(differences)
            + ".",
            RuntimeWarning,
            stacklevel=6,
        )
    changed = topology_changes(saved, now)
    if changed:
        warnings.warn(
            f"Resuming from `{source}` on another topology: {'; '.join(changed)}. What holds: "
            f"{TOPOLOGY_HOLDS}.",
            RuntimeWarning,
            stacklevel=6,
        )


def topology_changes(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Each topology setting that differs between a checkpoint's settings and this run's,
    with what it changes (settings unknown on either side are skipped; a one-axis mesh says
    no more than `devices`, so only meshes of several axes are compared)."""
    changed = []
    for key, what in _TOPOLOGY.items():
        old, new = saved.get(key), now.get(key)
        if old is None or new is None or old == new:
            continue
        if key == "mesh" and "," not in old and "," not in new:
            continue
        changed.append(f"`{key}` {old} in the checkpoint, {new} now ({what})")
    return changed


def check_batch_split(saved: dict[str, Any], placement: Placement, source: Any) -> None:
    """Raise `ValueError` if a checkpoint taken mid-epoch has a global batch size that does
    not split over this run's data axis (the rest of the epoch must keep its batches)."""
    size, shards = saved.get("train_batch_size"), placement.data_shards
    if size is None or size % shards == 0:
        return
    fits = max(d for d in range(1, min(size, shards) + 1) if size % d == 0)
    over = (
        f"{shards} devices"
        if shards == placement.num_devices
        else f"{shards} slices of its data axis {placement.data_axis!r}"
    )
    raise ValueError(
        f"`{source}` was taken mid-epoch with a global batch size of {size}, which does not "
        f"split evenly over this Trainer's {over}. The rest of the epoch must keep batches "
        f"of {size} (its position counts them): resume on a number of devices that divides "
        f"{size} (for example `devices={fits}`), or from a checkpoint taken at the end of "
        f"an epoch with a batch size that is a multiple of {shards}."
    )


def resolve(
    savers: Sequence[Saver], ckpt_path: str | os.PathLike
) -> tuple[Path, dict[str, Any]] | None:
    """Turn `ckpt_path` into a verified checkpoint: `"last"` (`None` if the first saver's
    directory holds none yet), `"best"` (by that saver's `monitor`) or a path."""
    if ckpt_path not in ("last", "best"):
        location = check_path(ckpt_path, "ckpt_path")
        path = materialize(location) if is_remote(location) else Path(location)
        try:
            return path, open_checkpoint(path, hint=" or `ckpt_path='last'`")
        except CheckpointError as error:
            raise CheckpointError(f"Cannot resume from `{path}`: {error}") from None
    if not savers:
        raise ValueError(
            f"`ckpt_path={ckpt_path!r}` looks in the `dirpath` of a `ModelCheckpoint` "
            "callback, but this Trainer has none. Add `ModelCheckpoint(dirpath)` to "
            "`callbacks=` or pass the path of a checkpoint."
        )
    saver = savers[0]
    if ckpt_path == "last":
        found = saver.find_last()
        if found is None:
            log.info("ckpt_path='last': no checkpoint in %s yet; starting afresh.", saver.dirpath)
        return found
    if saver.monitor is None:
        raise ValueError(
            "`ckpt_path='best'` needs a `ModelCheckpoint` with a `monitor=` metric; this one "
            "ranks nothing. Use `ckpt_path='last'` or a path."
        )
    found = saver.find_best()
    if found is None:
        raise FileNotFoundError(
            f"`ckpt_path='best'`: no valid checkpoint scored by `{saver.monitor}` in "
            f"`{saver.dirpath}`."
        )
    return found


def resume(run: Run, path: Path, document: dict[str, Any], continue_stopped: bool) -> None:
    """Make `run` the run the checkpoint at `path` was taken from."""
    if document.get("kind") != "trainer":
        raise ValueError(
            f"`{path}` was written by `solstice.save`, not during training, so it holds no "
            "training state to resume. Load it with `solstice.load(path, like=experiment)` "
            "and pass that experiment to `fit` without `ckpt_path`."
        )
    leaves = jax.tree.leaves(run.dyn)
    state = CheckpointState.read(
        path,
        document,
        experiment=run.dyn,
        shardings=[x.sharding for x in leaves],
        in_step=run.in_step_state.tree or {},
        replicated=run.placement.replicated,
    )
    _apply(run, state)
    saved, mid_epoch = state.host.settings, run.progress.batch_idx > 0
    if mid_epoch:
        check_batch_split(saved, run.placement, path)
    check_settings(saved, run_settings(run), path, mid_epoch=mid_epoch)
    run.resumed_from = (path, saved)  # the batch size is compared at the first batch
    _restore_stop(run, state.host.stopped, saved, path, continue_stopped)
    p = run.progress
    log.info(
        "Resumed from %s: epoch %d, batch %d, global step %d.",
        path,
        p.epoch,
        p.batch_idx,
        p.global_step,
    )


def _apply(run: Run, state: CheckpointState) -> None:
    """Put the checkpoint's state into `run`."""
    trainer, host = run.trainer, state.host
    # Re-placed on the Trainer's own shardings: Orbax may write an equivalent spec another
    # way (`P("batch",)` for `P("batch", None)`), which would compile a different program.
    run.experiment_state.tree = run.place(state.device.experiment, copy=False)
    if state.device.in_step:
        run.in_step_state.tree = state.device.in_step
    run.progress.load_state_dict(host.progress)
    if host.accumulating is not None:
        run.accumulators.restore(host.accumulating, state.device.metrics)
    if run.datamodule is not None and host.datamodule is not None:
        run.datamodule.load_state_dict(host.datamodule)
    keys = callback_keys(trainer.callbacks)
    for key, cb in keys:
        if key in host.callbacks:
            cb.load_state_dict(host.callbacks[key])
    unused = set(host.callbacks) - {key for key, _ in keys}
    if unused:
        log.info("Checkpoint state of callbacks not in this Trainer, unused: %s", sorted(unused))
    trainer.history.load_state_dict(host.history)
    trainer.callback_metrics.clear()
    trainer.callback_metrics.update(host.callback_metrics)


def _limits_raised(saved: dict[str, Any], run: Run) -> bool:
    """Whether this Trainer may train further than the run that wrote the checkpoint."""
    trainer = run.trainer
    for key, now in (("max_epochs", trainer.max_epochs), ("max_steps", trainer.max_steps)):
        old = saved.get(key)
        if now is not None and (old is None or now > old):
            if old is None and key == "max_steps" and saved.get("max_epochs") is not None:
                continue  # a new step limit alone never extends an epoch-limited run
            return True
    return False


def _restore_stop(
    run: Run, stopped: dict[str, Any] | None, saved: dict[str, Any], path: Path, go_on: bool
) -> None:
    """A run that was stopped stays stopped (see `Trainer.fit`); one that had completed says
    so."""
    if stopped is not None and stopped.get("final", True):
        if go_on or _limits_raised(saved, run):
            log.info("Resuming a run that %s had stopped, as asked.", stopped.get("by"))
            return
        run.should_stop, run.stopped = True, dict(stopped)
        if not run.controls.min_reached(run.progress):
            return  # deferred until `min_epochs`/`min_steps`, as in the run that stopped
        warnings.warn(
            f"The run in `{path}` was stopped by {stopped.get('by')} at epoch "
            f"{stopped.get('epoch')} (global step {stopped.get('global_step')}): "
            f"{stopped.get('reason')} `fit` returns its experiment without training. To train "
            "on, raise `max_epochs`/`max_steps`, or pass `continue_stopped=True`.",
            UserWarning,
            stacklevel=6,
        )
        return
    trainer, p = run.trainer, run.progress
    done = (trainer.max_epochs is not None and p.epoch >= trainer.max_epochs) or (
        trainer.max_steps is not None and p.global_step >= trainer.max_steps
    )
    if done:
        warnings.warn(
            f"`{path}` is at epoch {p.epoch}, global step {p.global_step}: this Trainer's "
            f"limits (max_epochs={trainer.max_epochs}, max_steps={trainer.max_steps}) are "
            "reached, so `fit` returns its experiment without training. Raise them to train on.",
            UserWarning,
            stacklevel=6,
        )
