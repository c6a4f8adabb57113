"""`ModelCheckpoint`: asynchronous, atomic, verified checkpoints with Lightning's retention."""

import dataclasses
import datetime
import logging
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import equinox as eqx
import jax

from .._checks import check_int, check_seconds
from .._periodic import Every
from .._view import TrainerView
from ..checkpointing._checkpoint_state import CheckpointState
from ..checkpointing._format import (
    CHECKPOINT_NAME,
    DELETING_SUFFIX,
    HISTORY_FILE,
    METADATA_FILE,
    ORBAX_TMP_SUFFIX,
)
from ..checkpointing._orbax import CheckpointWriter
from ..checkpointing._remote import RemoteCheckpoints, staging_dir
from ..checkpointing._saver import EPOCH, INTERRUPT, VALIDATION, SaveMoment, Saver
from ..checkpointing._tree import all_finite
from ..storage._paths import check_path, is_remote, url_join
from ._callback import Callback
from ._monitor import Monitor, better, check_mode, worst

log = logging.getLogger("solstice")


@dataclasses.dataclass
class _Save:
    """A save decided (the books already hold it), then written (committed on `wait`)."""

    path: Path
    snapshot: dict[str, Any]  # the books before it: restored if it fails
    info: dict[str, Any]  # `"checkpoint"` in its metadata


class ModelCheckpoint(Callback, Saver):
    """Saves the whole training state, asynchronously and atomically, and keeps the best.

    A checkpoint is a directory `dirpath/epoch=E-step=S` (`-v1`, `-v2`, ... if that name is
    taken) holding the experiment's arrays (parameters, optimizer and PRNG state), written by
    Orbax, and `solstice.json`: the Trainer's position (epoch, global step, batch within the
    epoch, validation runs), the on-device metric accumulators of the current epoch, the
    datamodule's `state_dict`, every callback's `state_dict`, the logger run ids, the metric
    history, a format version and a SHA-256 of every file. No pickle. `Trainer.fit(...,
    ckpt_path="last" | "best" | path)` resumes from it exactly.

    - **Asynchronous:** the training thread waits only for the device-to-host copy; writing
      happens on a background thread (the next save, the end of `fit`, or an exception waits
      for it).
    - **Atomic:** Orbax writes into `<name>.orbax-checkpoint-tmp` and renames it when
      complete, so a crash mid-save leaves every earlier checkpoint intact and the partial one
      ignored. A damaged checkpoint (failed checksum, truncated file) is reported and skipped
      when resuming, never loaded, deleted or overwritten.
    - **Failures:** a save that fails (full disk, permissions) is reported with a
      `RuntimeWarning`; training continues and older checkpoints stay.
    - **Never non-finite:** a state with NaN/inf in its floating-point arrays is not saved.
    - **Loggers are told:** each committed checkpoint is announced to the loggers
      (`Logger.after_save_checkpoint(path, info)`, on their threads), e.g. for
      `MLFlowLogger` to record or copy it.

    When to save (triggers combine; each fires on its own): every `every_n_epochs` epochs at
    the end of the epoch (after validation, so `val/*` metrics can be monitored), every
    `every_n_train_steps` training steps, and every `train_time_interval`. Pass
    `every_n_epochs=None` to save only on steps or time. With `Trainer(val_check_interval=...)`
    and a `val/*` monitor, right after every validation within an epoch too (in the epochs
    `every_n_epochs` selects), ranked by it.

    What to keep (Lightning's semantics): the best `save_top_k` checkpoints by `monitor`
    (`-1`: all; `0`: none), plus the most recent one if `save_last`. Without `monitor`,
    `save_top_k=1` keeps the most recent checkpoint only. A checkpoint falls out of the kept
    set only once a newer one is committed. An epoch-end save is ranked only if `monitor` was
    computed in that epoch: with `check_val_every_n_epoch=2` and a `val/*` monitor, the
    epochs that do not validate are saved only as the most recent checkpoint (`save_last`).

    `ModelCheckpoint`s run after every other callback, so the state they save includes
    everything the other callbacks did in the same hook. When several save at the same moment,
    all decide (and update their books) before any writes, so every checkpoint of that moment
    records the books each callback keeps after all of them: a run resumed from any of them
    keeps and deletes exactly what the uninterrupted run does. Nothing is saved with
    `Trainer(fast_dev_run=...)`.

    **Arguments:**

    - `dirpath`: the directory of the checkpoints (created when first needed).
    - `monitor`: the metric ranking checkpoints, from `trainer.callback_metrics` (e.g.
      `"val/loss"`, `"train/loss_epoch"`); `None` ranks by recency.
    - `mode`: `"min"` or `"max"`: which direction of `monitor` is better.
    - `save_top_k`: how many of the best to keep (`-1` all, `0` none).
    - `save_last`: also keep the most recent checkpoint.
    - `every_n_train_steps`: save every n training steps (`None`/`0`: never).
    - `every_n_epochs`: save at the end of every n-th epoch (`None`/`0`: never).
    - `train_time_interval`: save when this much time (a `datetime.timedelta` or seconds)
      has passed since the last save.
    - `clock`: the time source of `train_time_interval` (`time.monotonic`); pass a function
      to drive time in tests.

    **Attributes:** `best_model_path`, `best_model_score`, `last_model_path`,
    `best_k_models` (path -> score), `kth_best_model_path`, `kth_value`.

    **Example:**

    ```python
    checkpoint = ModelCheckpoint("ckpts", monitor="val/accuracy", mode="max", save_top_k=2)
    trainer = solstice.Trainer(max_epochs=10, callbacks=[checkpoint])
    trainer.fit(experiment, datamodule)
    # after a crash or preemption, in a new process:
    trainer.fit(experiment, datamodule, ckpt_path="last")
    best = solstice.load(checkpoint.best_model_path, like=experiment)
    ```
    """

    def __init__(
        self,
        dirpath: str | os.PathLike,
        monitor: str | None = None,
        mode: str = "min",
        save_top_k: int = 1,
        save_last: bool = True,
        every_n_train_steps: int | None = None,
        every_n_epochs: int | None = 1,
        train_time_interval: "datetime.timedelta | float | None" = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ):
        location = check_path(dirpath, "ModelCheckpoint(dirpath=...)")
        # remote storage: checkpoints are written into a local staging directory, then
        # uploaded (see `solstice.checkpointing._remote`)
        self.remote = RemoteCheckpoints(location) if is_remote(location) else None
        self.dirpath = staging_dir(location) if self.remote else Path(location).absolute()
        self._remote_names: set[str] = set()
        if self.dirpath.exists() and not self.dirpath.is_dir():
            raise ValueError(
                f"`ModelCheckpoint(dirpath={str(dirpath)!r})` is a file, not a directory."
            )
        check_mode(mode, "ModelCheckpoint")
        if isinstance(save_top_k, bool) or not isinstance(save_top_k, int) or save_top_k < -1:
            raise ValueError(
                f"`ModelCheckpoint(save_top_k={save_top_k!r})` must be an int >= -1 (-1 keeps "
                "all checkpoints, 0 none)."
            )
        if monitor is None and save_top_k not in (-1, 0, 1):
            raise ValueError(
                f"`ModelCheckpoint(save_top_k={save_top_k}, monitor=None)`: without a metric "
                "there is nothing to rank the top k by. Pass `monitor=` (e.g. 'val/loss'), "
                "or `save_top_k` in (-1, 0, 1)."
            )
        self.monitor = monitor
        self.mode = mode
        self.save_top_k = save_top_k
        self.save_last = bool(save_last)
        check_int(
            "`ModelCheckpoint(every_n_train_steps=...)`", every_n_train_steps, allow_none=True
        )
        check_int("`ModelCheckpoint(every_n_epochs=...)`", every_n_epochs, allow_none=True)
        self.every_n_train_steps = every_n_train_steps or 0
        self.every_n_epochs = every_n_epochs or 0
        self.train_time_interval = check_seconds(
            "`ModelCheckpoint(train_time_interval=...)`", train_time_interval
        )
        # when step- and time-triggered saves are due (`clock`: injectable for tests)
        self._every = Every(self.every_n_train_steps or None, self.train_time_interval, clock=clock)
        self._monitor = Monitor(monitor, "ModelCheckpoint") if monitor is not None else None

        self.best_k_models: dict[str, float | None] = {}
        self.best_model_path = ""
        self.best_model_score: float | None = None
        self.kth_best_model_path = ""
        self.kth_value: float | None = None
        self.last_model_path = ""
        self._last_global_step_saved = -1
        self._evicting: list[str] = []  # dropped from the books, deleted once a save commits
        self._writer: Any = None
        self._planned: _Save | None = None  # decided, not yet written
        self._pending: _Save | None = None  # written, not yet known to be committed
        self._committed: list[_Save] = []  # committed, not yet announced to the loggers

    # ------------------------------------------------------------------ identity and state
    @property
    def state_key(self) -> str:
        """The name of this callback's state in a checkpoint."""
        return (
            f"ModelCheckpoint{{monitor={self.monitor!r}, mode={self.mode!r}, "
            f"every_n_train_steps={self.every_n_train_steps}, "
            f"every_n_epochs={self.every_n_epochs}, "
            f"train_time_interval={self.train_time_interval}}}"
        )

    def required_metrics(self) -> tuple[str, ...]:
        return () if self.monitor is None else (self.monitor,)

    @property
    def saves_on_steps(self) -> bool:
        """Whether the Trainer asks after every training call (step or time triggers)."""
        return bool(self.every_n_train_steps) or self.train_time_interval is not None

    def _bookkeeping(self) -> dict[str, Any]:
        return {
            "best_k_models": dict(self.best_k_models),
            "best_model_path": self.best_model_path,
            "best_model_score": self.best_model_score,
            "kth_best_model_path": self.kth_best_model_path,
            "kth_value": self.kth_value,
            "last_model_path": self.last_model_path,
            "last_global_step_saved": self._last_global_step_saved,
            "evicting": list(self._evicting),
        }

    def _set_bookkeeping(self, state: dict[str, Any]) -> None:
        self.best_k_models = dict(state["best_k_models"])
        self.best_model_path = state["best_model_path"]
        self.best_model_score = state["best_model_score"]
        self.kth_best_model_path = state["kth_best_model_path"]
        self.kth_value = state["kth_value"]
        self.last_model_path = state["last_model_path"]
        self._last_global_step_saved = state["last_global_step_saved"]
        # Dropped from the books, not yet deleted: a checkpoint records them before it (and
        # the other callbacks' saves of its moment) commits. A run resumed from it deletes
        # them once this callback's next save commits, whether or not that moment's did.
        self._evicting = list(state.get("evicting", []))

    @property
    def location(self) -> str:
        """Where the checkpoints go: `dirpath`, or the URL of remote storage."""
        return self.remote.url if self.remote is not None else str(self.dirpath)

    def _public(self, path: Path) -> str:
        """How a checkpoint is named to users (`best_model_path`, ...): its URL if remote."""
        return url_join(self.remote.url, path.name) if self.remote is not None else str(path)

    def state_dict(self) -> dict[str, Any]:
        return {"dirpath": self.location, **self._bookkeeping()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("dirpath") == self.location:
            self._set_bookkeeping(state)
            return
        log.info(
            "ModelCheckpoint: the checkpoint was written to %s, this callback writes to %s; "
            "only `best_model_path` is restored, retention starts afresh here.",
            state.get("dirpath"),
            self.location,
        )
        self.best_model_path = state.get("best_model_path", "")
        self._last_global_step_saved = state.get("last_global_step_saved", -1)

    # ------------------------------------------------------------------ hooks
    def on_train_start(self, trainer, experiment) -> None:
        self._every.start(max(self._last_global_step_saved, 0))
        if self._monitor is not None:
            self._monitor.start()
        if self.remote is not None:
            self._start_remote()
        if self.dirpath.is_dir() and jax.process_index() == 0:
            # checkpoints this callback was deleting, or still writing (Orbax's tmp dirs:
            # never renamed, so never valid), when the process died
            for suffix in (DELETING_SUFFIX, ORBAX_TMP_SUFFIX):
                for trash in self.dirpath.glob(f"*{suffix}*"):
                    shutil.rmtree(trash, ignore_errors=True)

    def _start_remote(self) -> None:
        """Remote storage: what is there, and the uploads a killed run left unfinished (no
        `solstice.json`: never valid) removed."""
        assert self.remote is not None
        if jax.process_count() > 1:
            raise ValueError(
                f"`ModelCheckpoint({self.remote.url!r})`: checkpoints on remote storage are "
                f"written by one process; this run has {jax.process_count()}. Use a directory "
                "every process shares (a network filesystem), or one process."
            )
        documents, unfinished = self.remote.documents()
        for name in unfinished:
            self.remote.delete(name)
        self._remote_names = set(documents)

    def on_validation_end(self, trainer, experiment) -> None:
        if self._monitor is not None:
            self._monitor.note_validation(trainer)

    def on_train_end(self, trainer, experiment) -> None:
        if self._monitor is not None:
            self._monitor.check_seen(trainer)

    def on_fit_end(self, trainer, experiment) -> None:
        self.wait()
        self._announce(trainer)

    def on_exception(self, trainer, experiment, exception) -> None:
        self.wait()
        self._announce(trainer)

    def _announce(self, trainer: TrainerView) -> None:
        """Tell the loggers about the checkpoints committed since the last call
        (`Logger.after_save_checkpoint`)."""
        committed, self._committed = self._committed, []
        for save in committed:
            trainer.after_save_checkpoint(str(save.path), save.info)

    # ------------------------------------------------------------------ finding
    def find_last(self) -> tuple[Path, dict[str, Any]] | None:
        if self.remote is None:
            return super().find_last()
        self._pull_history()
        return self.remote.find_last(self.dirpath)

    def find_best(self) -> tuple[Path, dict[str, Any]] | None:
        if self.remote is None:
            return super().find_best()
        assert self.monitor is not None
        self._pull_history()
        return self.remote.find_best(self.dirpath, self.monitor, self.mode)

    def _pull_history(self) -> None:
        """The run's metric history (`history.jsonl`, which a checkpoint counts records of)
        from remote storage into the staging directory, where the resumed run reads it."""
        assert self.remote is not None
        text = self.remote.read_text(HISTORY_FILE)
        if text is not None:
            self.dirpath.mkdir(parents=True, exist_ok=True)
            (self.dirpath / HISTORY_FILE).write_text(text)

    # ------------------------------------------------------------------ the Saver side
    # The Trainer asks `plan` at every moment a save may happen, captures the run's state
    # once every saver of the moment has planned (and updated its books), then hands it to
    # `write` (see `solstice.checkpointing.Saver`).
    def time_due(self) -> bool:
        """Whether `train_time_interval` has passed since the last save, on this process's
        clock."""
        return self._every.time_due()

    def plan(self, moment: SaveMoment, trainer: TrainerView, taken: set[Path]) -> _Save | None:
        """Decide whether to save at `moment` (see `ModelCheckpoint` for when)."""
        if trainer.fast_dev_run or self._planned is not None:
            return None
        step = trainer.global_step
        if moment.kind == VALIDATION and not self._ranks_validations:
            return None
        if moment.kind in (EPOCH, VALIDATION):
            # `None` unless measured since the last read: an epoch that did not validate is
            # not ranked with an earlier validation's value (it can still be the last one)
            score = self._monitor.read(trainer) if self._monitor is not None else None
            if not self.every_n_epochs or (trainer.current_epoch + 1) % self.every_n_epochs:
                return None
            if score is None and step == self._last_global_step_saved:
                return None  # a save of this very state exists, and this one ranks nothing
            return self._plan(trainer, moment.kind, score, taken)
        if step == self._last_global_step_saved:
            return None  # saved (or decided not to) at this very step already
        if moment.kind == INTERRUPT:
            return self._plan(trainer, INTERRUPT, None, taken)
        if self._every.step_due(step):
            reason = "step"
        elif moment.time_due:
            reason = "time"
        else:
            return None
        score = self._monitor.current(trainer) if self._monitor is not None else None
        return self._plan(trainer, reason, score, taken)

    @property
    def _ranks_validations(self) -> bool:
        """Whether a validation within an epoch (`val_check_interval`) is a save moment:
        with a `val/*` monitor, so the top k are written right after the validation that
        ranks them."""
        return self.monitor is not None and self.monitor.startswith("val/")

    def planned_path(self, plan: _Save) -> Path:
        return plan.path

    def write(self, plan: _Save, state: CheckpointState) -> None:
        """Start writing `state` to the planned path in the background."""
        items, metadata = state.to_checkpoint({"checkpoint": plan.info})
        self._planned = None
        if self._writer is None:
            self._writer = CheckpointWriter()
        try:
            self.dirpath.mkdir(parents=True, exist_ok=True)
            self._writer.save(plan.path, items, metadata)
        except Exception as error:  # noqa: BLE001 - reported, training continues
            self._failed(plan, error)
            return
        self._pending = plan

    def wait(self) -> None:
        """Block until the save in progress (if any) is committed, then apply retention (a
        save planned but never written is dropped from the books)."""
        planned, self._planned = self._planned, None
        if planned is not None:  # decided but never written (an exception came between)
            self._set_bookkeeping(planned.snapshot)
        self._finish_pending()

    # ------------------------------------------------------------------ saving
    def _is_top_k(self, score: float | None, reason: str) -> bool:
        k = self.save_top_k
        if reason == "interrupt" or k == 0:
            return False
        if self.monitor is None:
            return True
        if score is None:
            return False
        if k == -1 or len(self.best_k_models) < k:
            return True
        return better(score, self._score(self.kth_best_model_path), self.mode)

    def _record(self, path: str, score: float | None, top_k: bool) -> list[str]:
        """Update the bookkeeping for a new checkpoint; return the paths it makes obsolete."""
        evicted: list[str] = []
        previous_last = self.last_model_path
        if top_k:
            if self.monitor is None:
                if self.save_top_k == 1:
                    evicted.extend(self.best_k_models)
                    self.best_k_models = {}
                self.best_k_models[path] = None
                self.best_model_path = path
            else:
                self.best_k_models[path] = score
                if self.save_top_k != -1 and len(self.best_k_models) > self.save_top_k:
                    drop = self._kth()
                    evicted.append(drop)
                    del self.best_k_models[drop]
                best = max(
                    self.best_k_models,
                    key=lambda p: self._score(p) * (1 if self.mode == "max" else -1),
                )
                self.best_model_path = best
                self.best_model_score = self.best_k_models[best]
                self.kth_best_model_path = self._kth()
                self.kth_value = self.best_k_models[self.kth_best_model_path]
        self.last_model_path = path
        if previous_last and previous_last != path:
            evicted.append(previous_last)
        return [p for p in dict.fromkeys(evicted) if p not in self.best_k_models and p != path]

    def _kth(self) -> str:
        """The worst of the kept best (the first to go)."""
        sign = -1 if self.mode == "max" else 1
        return max(self.best_k_models, key=lambda p: sign * self._score(p))

    def _score(self, path: str) -> float:
        """The score of a kept checkpoint (with a `monitor`, every kept one has one)."""
        score = self.best_k_models[path]
        return worst(self.mode) if score is None else score

    def _new_path(self, trainer: TrainerView, taken: set[Path]) -> Path:
        name = f"epoch={trainer.current_epoch}-step={trainer.global_step}"
        # taken: on disk, or planned by another saver of this moment (in the same directory)
        candidate, version = name, 0
        while (
            self.dirpath / candidate in taken
            or candidate in self._remote_names
            or any(
                (self.dirpath / (candidate + suffix)).exists()
                for suffix in ("", ORBAX_TMP_SUFFIX, DELETING_SUFFIX)
            )
        ):
            version += 1
            candidate = f"{name}-v{version}"
        return self.dirpath / candidate

    def _plan(
        self, trainer: TrainerView, reason: str, score: float | None, taken: set[Path]
    ) -> _Save | None:
        """Decide a save now and update the books as if it were committed (`write` writes
        it; a failure restores the books)."""
        self._finish_pending()
        self._announce(trainer)
        step = trainer.global_step
        if not all_finite(eqx.filter(trainer.experiment, eqx.is_array)):
            message = (
                f"ModelCheckpoint: not saving at global step {step}: the experiment holds "
                "NaN or inf values. The last finite checkpoint "
                f"(`{self.last_model_path or 'none yet'}`) is kept."
            )
            stopped = trainer.stopped
            if stopped is not None and stopped.get("by") == "TerminateOnNaN":
                log.info(message)  # TerminateOnNaN has said so already
            else:
                warnings.warn(message, RuntimeWarning, stacklevel=2)
            return None
        if score is not None and math.isnan(score):
            score = worst(self.mode)
        top_k = self._is_top_k(score, reason)
        if not (top_k or self.save_last or reason == INTERRUPT):
            self._last_global_step_saved = self._every.last_step = step
            return None
        path = self._new_path(trainer, taken)
        snapshot = self._bookkeeping()
        self._evicting.extend(self._record(self._public(path), score, top_k))
        self._last_global_step_saved = step
        self._every.fired(step)
        info = {
            "name": path.name,
            "reason": reason,
            "monitor": self.monitor,
            "score": score if top_k else None,
        }
        self._planned = _Save(path, snapshot, info)
        return self._planned

    def _finish_pending(self) -> None:
        pending, self._pending = self._pending, None
        if pending is None:
            return
        error = self._writer.wait()
        if error is None and self.remote is not None:
            error = self._publish(pending.path)
        if error is not None:
            self._failed(pending, error)
            return
        self._committed.append(pending)
        kept = {*self.best_k_models, self.last_model_path}
        evicting, self._evicting = self._evicting, []
        for path in dict.fromkeys(evicting):
            if path not in kept:
                self._delete(path)

    def _publish(self, path: Path) -> Exception | None:
        """Upload a committed checkpoint (and the history beside it) to remote storage; the
        local copy is removed once it is there."""
        assert self.remote is not None
        try:
            history = self.dirpath / HISTORY_FILE
            if history.is_file():
                self.remote.upload_file(history, HISTORY_FILE)
            self.remote.publish(path)
        except Exception as error:  # noqa: BLE001 - reported by the caller
            return error
        self._remote_names.add(path.name)
        shutil.rmtree(path, ignore_errors=True)
        return None

    def _failed(self, save: _Save, error: BaseException) -> None:
        self._set_bookkeeping(save.snapshot)
        path = save.path
        if jax.process_index() == 0:  # an unfinished save of ours, it can never be valid
            shutil.rmtree(path.parent / (path.name + ORBAX_TMP_SUFFIX), ignore_errors=True)
            if self.remote is not None:  # an upload cut short: never valid either
                shutil.rmtree(path, ignore_errors=True)
                self.remote.delete(path.name)
        warnings.warn(
            f"ModelCheckpoint: could not write `{self._public(path)}`: "
            f"{type(error).__name__}: {error}. "
            "Training continues; earlier checkpoints are intact (most recent: "
            f"`{self.last_model_path or 'none'}`).",
            RuntimeWarning,
            stacklevel=3,
        )

    def _delete(self, public: str) -> None:
        """Remove a checkpoint this callback wrote and no longer keeps: renamed first
        (atomically), so a crash mid-delete never leaves a half checkpoint behind (remote:
        its `solstice.json` is deleted first)."""
        if jax.process_index() != 0:
            return
        if self.remote is not None:
            parent, _, name = public.rpartition("/")
            if parent == self.remote.url and CHECKPOINT_NAME.fullmatch(name):
                self.remote.delete(name)
                self._remote_names.discard(name)
                shutil.rmtree(self.dirpath / name, ignore_errors=True)
            return
        path = Path(public)
        if path.parent != self.dirpath or not (path / METADATA_FILE).is_file():
            return
        trash = path.parent / (path.name + DELETING_SUFFIX)
        try:
            os.replace(path, trash)
        except OSError as error:
            warnings.warn(
                f"ModelCheckpoint: could not remove `{path}`: {error}.",
                RuntimeWarning,
                stacklevel=3,
            )
            return
        shutil.rmtree(trash, ignore_errors=True)
