"""A Trainer's checkpoint state: what a checkpoint holds (`capture`) and how a run resumes.

A checkpoint is taken at a step boundary or at the end of an epoch (inside
`on_train_epoch_end`, when it records the start of the next epoch), so a resumed run takes
exactly the steps, hooks and metric updates the uninterrupted run would have taken.
"""

import json
import logging
import os
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jax

from ..callbacks._callback import Callback
from ..checkpointing._format import (
    CheckpointError,
    candidates,
    open_checkpoint,
    read_metadata,
    verify,
)
from ..checkpointing._orbax import read
from ..checkpointing._tree import (
    LeafSpec,
    abstract_storage,
    check_structure,
    from_storage,
    specs,
    storage_key,
    to_storage,
)

if TYPE_CHECKING:
    from ._trainer import Trainer

log = logging.getLogger("solstice")


def callback_keys(callbacks: Sequence[Callback]) -> list[tuple[str, Callback]]:
    """Stable names for callbacks in a checkpoint: `state_key` if a callback has one, else its
    class name; repeated names get `#1`, `#2`, ... in order."""
    seen: dict[str, int] = {}
    out = []
    for cb in callbacks:
        base = getattr(cb, "state_key", None) or type(cb).__qualname__
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.append((base if n == 0 else f"{base}#{n}", cb))
    return out


def _jsonable(metadata: dict[str, Any]) -> dict[str, Any]:
    try:
        return json.loads(json.dumps(metadata))
    except (TypeError, ValueError) as error:
        raise TypeError(
            f"Checkpoint state must be JSON-able (checkpoints are never pickled): {error}. "
            "Return plain dicts, lists, strings, numbers, bools and None from `state_dict()` "
            "(convert arrays with `.tolist()`)."
        ) from None


def _callback_states(trainer: "Trainer") -> list[tuple[str, dict[str, Any]]]:
    return [(key, cb.state_dict()) for key, cb in callback_keys(trainer.callbacks)]


def capture(trainer: "Trainer", extra: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The trainer's state now: `(items, metadata)` for `CheckpointWriter.save`.

    `items` holds the arrays (still on the device: Orbax copies them to the host); `metadata`
    is JSON-able. `extra` is merged into the metadata (who saved it, why, the score).
    """
    from .. import __version__

    progress = trainer.progress.state_dict()
    state = trainer._train_state
    experiment, experiment_specs = to_storage(trainer._dyn)
    items = {"experiment": experiment}
    trees = {"experiment": experiment_specs}
    accumulators = None
    if trainer._epoch_complete:
        progress["epoch"] += 1
        progress["batch_idx"] = 0
        progress["epoch_logged"] = False
    elif progress["batch_idx"] > 0 and state.acc is not None:
        items["train_accumulators"], trees["train_accumulators"] = to_storage(
            {"acc": state.acc, "total": state.total}
        )
        accumulators = state.state_dict()
    trainer._logging.flush_history()  # the history file must hold every record it counts
    trainer._read_nonfinite()
    metadata = {
        "kind": "trainer",
        "created_unix_ns": time.time_ns(),
        "solstice_version": __version__,
        "experiment_type": f"{type(trainer.experiment).__module__}."
        f"{type(trainer.experiment).__qualname__}",
        "trees": trees,
        "progress": progress,
        "train_accumulators": accumulators,
        "datamodule": None if trainer.datamodule is None else trainer.datamodule.state_dict(),
        "callbacks": {key: cb_state for key, cb_state in _callback_states(trainer) if cb_state},
        "history": trainer.history.state_dict(),
        "callback_metrics": dict(trainer.callback_metrics),
        "nonfinite_step": trainer.nonfinite_step,
        "stopped": trainer.stop_record(),
        "trainer": run_settings(trainer),
        **extra,
    }
    return items, _jsonable(metadata)


def run_settings(trainer: "Trainer") -> dict[str, Any]:
    """The settings a checkpoint records, which an exact resume needs unchanged (and the
    limits, to tell whether a resumed run that had stopped should train on)."""
    datamodule = trainer.datamodule
    return {
        "devices": trainer._placement.num_devices,
        "processes": jax.process_count(),
        "seed": trainer.seed,
        "steps_per_execution": trainer.steps_per_execution,
        "log_every_n_steps": trainer.log_every_n_steps,
        "train_batch_size": trainer.train_batch_size,
        "datamodule": None if datamodule is None else type(datamodule).__qualname__,
        "max_epochs": trainer.max_epochs,
        "max_steps": trainer.max_steps,
    }


# What a changed setting means for the resumed run (see `check_settings`).
_CONSEQUENCES = {
    "seed": "the seed keys the Trainer's randomness (on-device augmentation): the resumed run "
    "is not the run that was interrupted",
    "devices": "reductions over the batch run in another order: the result matches to float "
    "tolerance, not bit for bit",
    "processes": "each process feeds another share: the result matches to float tolerance, "
    "not bit for bit",
    "steps_per_execution": "the steps are compiled differently: the result matches to float "
    "tolerance, not bit for bit",
    "datamodule": "another DataModule gives other batches: the resumed run is not the run "
    "that was interrupted",
    "train_batch_size": "other batches, and schedules counted in steps advance at another "
    "pace: the resumed run is not the run that was interrupted",
}


def check_settings(
    saved: dict[str, Any], now: dict[str, Any], source: Any, *, mid_epoch: bool
) -> None:
    """Warn naming every setting that differs from the checkpoint's, with what it means;
    raise `ValueError` where an exact resume is impossible (another batch size mid-epoch:
    the position in the epoch counts batches). Settings unknown on either side are skipped."""
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
        differences.append(f"`{key}` {old} in the checkpoint, {new} now: {consequence}")
    if differences:
        warnings.warn(
            f"Resuming from `{source}` with other settings than it was written with. "
            + "; ".join(differences)
            + ".",
            RuntimeWarning,
            stacklevel=5,
        )


def _limits_raised(saved: dict[str, Any], trainer: "Trainer") -> bool:
    """Whether this Trainer may train further than the run that wrote the checkpoint."""
    for key, now in (("max_epochs", trainer.max_epochs), ("max_steps", trainer.max_steps)):
        old = saved.get(key)
        if now is not None and (old is None or now > old):
            if old is None and key == "max_steps" and saved.get("max_epochs") is not None:
                continue  # a new step limit alone never extends an epoch-limited run
            return True
    return False


# ---------------------------------------------------------------------- finding checkpoints
def _created(path: Path) -> int:
    try:
        return int(read_metadata(path).get("created_unix_ns", 0))
    except CheckpointError:
        try:
            return path.stat().st_mtime_ns
        except FileNotFoundError:
            # Removed since it was listed: with several processes, process 0 deletes what
            # retention drops (`ModelCheckpoint._delete`) while the others may already be
            # looking for the last checkpoint of their next `fit`. It ranks last.
            return -1


def _first_valid(paths: Sequence[Path], why: str) -> tuple[Path, dict[str, Any]] | None:
    for path in paths:
        try:
            document = verify(path)
        except CheckpointError as error:
            warnings.warn(
                f"Skipping checkpoint `{path}`: {error} It is left on disk untouched; "
                f"looking for the {why} one.",
                RuntimeWarning,
                stacklevel=4,
            )
            continue
        if document.get("kind") == "trainer":
            return path, document
    return None


def find_last(dirpath: str | os.PathLike) -> tuple[Path, dict[str, Any]] | None:
    """The newest valid training checkpoint in `dirpath` (corrupted ones are reported and
    skipped), or `None` if `dirpath` holds no checkpoint at all."""
    found, partial = candidates(dirpath)
    if partial:
        log.info("Ignoring unfinished saves in %s: %s", dirpath, [p.name for p in partial])
    if not found:
        return None
    result = _first_valid(sorted(found, key=_created, reverse=True), "previous")
    if result is None:
        raise CheckpointError(
            f"None of the {len(found)} checkpoint(s) in `{dirpath}` is valid (see the warnings "
            "above); they are left untouched. Pass `ckpt_path=` to one you trust or move them "
            "away to start afresh."
        )
    return result


def find_best(
    dirpath: str | os.PathLike, monitor: str, mode: str
) -> tuple[Path, dict[str, Any]] | None:
    """The valid checkpoint in `dirpath` with the best `monitor` score."""
    found, _ = candidates(dirpath)
    scored = []
    for path in found:
        try:
            info = read_metadata(path).get("checkpoint") or {}
        except CheckpointError:
            continue  # reported below if it would have been the best: cannot tell, skip
        score = info.get("score")
        if info.get("monitor") == monitor and isinstance(score, (int, float)):
            scored.append((score, _created(path), path))
    sign = 1 if mode == "max" else -1
    scored.sort(key=lambda t: (sign * t[0], t[1]), reverse=True)
    return _first_valid([p for _, _, p in scored], "next best")


def resolve(trainer: "Trainer", ckpt_path: str | os.PathLike) -> tuple[Path, dict] | None:
    """Turn `ckpt_path` into a verified checkpoint (`None`: `"last"` found nothing)."""
    if ckpt_path in ("last", "best"):
        checkpoints = trainer.checkpoint_callbacks
        if not checkpoints:
            raise ValueError(
                f"`ckpt_path={ckpt_path!r}` looks in the `dirpath` of a `ModelCheckpoint` "
                "callback, but this Trainer has none. Add `ModelCheckpoint(dirpath)` to "
                "`callbacks=` or pass the path of a checkpoint."
            )
        cb = checkpoints[0]
        if ckpt_path == "last":
            result = find_last(cb.dirpath)
            if result is None:
                log.info("ckpt_path='last': no checkpoint in %s yet; starting afresh.", cb.dirpath)
            return result
        if cb.monitor is None:
            raise ValueError(
                "`ckpt_path='best'` needs a `ModelCheckpoint` with a `monitor=` metric; this "
                "one ranks nothing. Use `ckpt_path='last'` or a path."
            )
        result = find_best(cb.dirpath, cb.monitor, cb.mode)
        if result is None:
            raise FileNotFoundError(
                f"`ckpt_path='best'`: no valid checkpoint scored by `{cb.monitor}` in "
                f"`{cb.dirpath}`."
            )
        return result
    path = Path(ckpt_path)
    try:
        document = open_checkpoint(path, hint=" or `ckpt_path='last'`")
    except CheckpointError as error:
        raise CheckpointError(f"Cannot resume from `{path}`: {error}") from None
    return path, document


# ---------------------------------------------------------------------- resuming
def resume_from(
    trainer: "Trainer", ckpt_path: str | os.PathLike, *, continue_stopped: bool = False
) -> Path | None:
    """Restore the trainer's state from a checkpoint (called by `fit(ckpt_path=...)`)."""
    result = resolve(trainer, ckpt_path)
    if result is None:
        return None
    path, document = result
    if document.get("kind") != "trainer":
        raise ValueError(
            f"`{path}` was written by `solstice.save`, not during training, so it holds no "
            "training state to resume. Load it with `solstice.load(path, like=experiment)` "
            "and pass that experiment to `fit` without `ckpt_path`."
        )
    template = trainer._dyn
    saved = [LeafSpec.from_json(d) for d in document["trees"]["experiment"]]
    check_structure(
        saved, specs(template), source=str(path), template_name=type(trainer.experiment).__name__
    )
    replicated = trainer._placement.replicated
    abstract = {
        "experiment": abstract_storage(template, saved, [replicated] * len(saved)),
    }
    acc_saved = [LeafSpec.from_json(d) for d in document["trees"].get("train_accumulators", [])]
    if acc_saved:
        abstract["train_accumulators"] = {
            storage_key(i): jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated)
            for i, s in enumerate(acc_saved)
        }
    restored = read(path, abstract)

    # Re-placed on the Trainer's own shardings: Orbax may write an equivalent spec another
    # way (`P("batch",)` for `P("batch", None)`), which would compile a different program.
    trainer._dyn = trainer._place_experiment(
        from_storage(template, saved, restored["experiment"]), copy=False
    )
    trainer._experiment_cache = None
    trainer.progress.load_state_dict(document["progress"])
    trainer._train_state = type(trainer._train_state)(trainer._true, trainer._false)
    if document.get("train_accumulators") is not None:
        trainer._train_state.load_state_dict(
            document["train_accumulators"], acc_saved, restored.get("train_accumulators")
        )
    if trainer.datamodule is not None and document.get("datamodule") is not None:
        trainer.datamodule.load_state_dict(document["datamodule"])
    states = document.get("callbacks", {})
    for key, cb in callback_keys(trainer.callbacks):
        if key in states:
            cb.load_state_dict(states[key])
    unused = set(states) - {key for key, _ in callback_keys(trainer.callbacks)}
    if unused:
        log.info("Checkpoint state of callbacks not in this Trainer, unused: %s", sorted(unused))
    trainer.history.load_state_dict(document["history"])
    trainer.callback_metrics = {k: float(v) for k, v in document["callback_metrics"].items()}
    trainer.nonfinite_step = document.get("nonfinite_step")
    saved = document.get("trainer", {})
    check_settings(saved, run_settings(trainer), path, mid_epoch=trainer.progress.batch_idx > 0)
    trainer._resumed_from = (path, saved)  # the batch size is compared at the first batch
    _restore_stop(trainer, document.get("stopped"), saved, path, continue_stopped)
    p = trainer.progress
    log.info(
        "Resumed from %s: epoch %d, batch %d, global step %d.",
        path,
        p.epoch,
        p.batch_idx,
        p.global_step,
    )
    return path


def _restore_stop(
    trainer: "Trainer",
    stopped: dict[str, Any] | None,
    saved: dict[str, Any],
    path: Path,
    continue_stopped: bool,
) -> None:
    """A run that was stopped stays stopped (see `Trainer.fit`); one that had completed says
    so."""
    p = trainer.progress
    if stopped is not None and stopped.get("final", True):
        if continue_stopped or _limits_raised(saved, trainer):
            log.info(
                "Resuming a run that %s stopped at epoch %s (step %s), as asked.",
                stopped.get("by"),
                stopped.get("epoch"),
                stopped.get("global_step"),
            )
            return
        trainer.should_stop = True
        trainer.stopped = dict(stopped)
        warnings.warn(
            f"The run in `{path}` was stopped by {stopped.get('by')} at epoch "
            f"{stopped.get('epoch')} (global step {stopped.get('global_step')}): "
            f"{stopped.get('reason')} `fit` returns its experiment without training. To "
            "train on, raise `max_epochs`/`max_steps`, or pass `continue_stopped=True`.",
            UserWarning,
            stacklevel=5,
        )
        return
    done = (trainer.max_epochs is not None and p.epoch >= trainer.max_epochs) or (
        trainer.max_steps is not None and p.global_step >= trainer.max_steps
    )
    if done:
        warnings.warn(
            f"`{path}` is at epoch {p.epoch}, global step {p.global_step}: this Trainer's "
            f"limits (max_epochs={trainer.max_epochs}, max_steps={trainer.max_steps}) are "
            "reached, so `fit` returns its experiment without training. Raise them to train "
            "on.",
            UserWarning,
            stacklevel=5,
        )
