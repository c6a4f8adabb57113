"""`OnExceptionCheckpoint`: a resumable checkpoint of the run when `fit` raises."""

import os
import shutil
import warnings
from pathlib import Path

import equinox as eqx
import jax

from .._view import TrainerView
from ..checkpointing._checkpoint_state import CheckpointState
from ..checkpointing._format import DELETING_SUFFIX, ORBAX_TMP_SUFFIX
from ..checkpointing._orbax import CheckpointWriter
from ..checkpointing._saver import EXCEPTION, SaveMoment, Saver
from ..checkpointing._tree import all_finite
from ._callback import Callback


class OnExceptionCheckpoint(Callback, Saver):
    """Saves the run's state when `fit` raises (Lightning's `OnExceptionCheckpoint`): an
    error in a hook, in the data loader or in a step, Ctrl-C, a `SystemExit`.

    The checkpoint, the directory `dirpath/filename`, is a full training checkpoint like
    `ModelCheckpoint`'s (atomic, verified, never pickled): `fit(experiment, datamodule,
    ckpt_path=checkpoint.path)` resumes from it exactly where the run was, bit for bit. A
    later exception replaces it (the old one is removed once the new one is committed).

    The Trainer asks it only when the state is one a resume can continue from, and otherwise
    says why none was written (a `RuntimeWarning`), never writing a damaged one:

    - an exception inside a training step's computation, after its arrays were handed to
      it (donated), leaves no state: nothing is written;
    - so does one between a fused call (`steps_per_execution`) and the bookkeeping of all
      of its steps (an `on_train_batch_end` hook of one of them);
    - a state with NaN or inf in the experiment's arrays is not saved;
    - nor, with several processes, any (the exception reaches one process, a save needs
      them all).

    An exception in a hook leaves the state after the step or epoch the hook was called
    for: the resumed run goes on from there, and the hooks that had not run for that moment
    do not run again. If the failing step closed a log interval, that interval's metrics
    are not logged (the epoch's metrics still count every step).

    **Arguments:**

    - `dirpath`: the directory of the checkpoint (created when needed).
    - `filename`: the checkpoint's name in it.

    **Example:**

    ```python
    on_error = OnExceptionCheckpoint("ckpts")
    trainer = solstice.Trainer(max_epochs=10, callbacks=[on_error])
    try:
        trainer.fit(experiment, datamodule)
    except Exception:
        ...  # fix the cause, then, in a new Trainer:
    solstice.Trainer(max_epochs=10).fit(experiment, datamodule, ckpt_path=on_error.path)
    ```
    """

    def __init__(self, dirpath: str | os.PathLike, filename: str = "on_exception"):
        if not isinstance(dirpath, (str, os.PathLike)):
            raise TypeError(
                f"`OnExceptionCheckpoint(dirpath=...)` must be a path, got {dirpath!r}."
            )
        if "://" in str(dirpath):
            raise ValueError(
                f"`OnExceptionCheckpoint(dirpath={str(dirpath)!r})`: remote storage is not "
                "supported here yet; pass a local directory (a failing run should not wait "
                "for an upload before it ends)."
            )
        if not isinstance(filename, str) or not filename or Path(filename).name != filename:
            raise ValueError(
                f"`OnExceptionCheckpoint(filename={filename!r})` must be a plain name (no "
                "directories), e.g. 'on_exception'."
            )
        self.dirpath = Path(dirpath).absolute()
        if self.dirpath.exists() and not self.dirpath.is_dir():
            raise ValueError(
                f"`OnExceptionCheckpoint(dirpath={str(dirpath)!r})` is a file, not a directory."
            )
        self.filename = filename
        self._writer: CheckpointWriter | None = None
        self._replacing: Path | None = None  # the previous checkpoint, set aside

    @property
    def path(self) -> Path:
        """Where the checkpoint is written: `dirpath / filename`."""
        return self.dirpath / self.filename

    @property
    def saves_on_exception(self) -> bool:
        return True

    def on_exception(self, trainer, experiment, exception) -> None:
        self.wait()

    # ------------------------------------------------------------------ the Saver side
    def plan(self, moment: SaveMoment, trainer: TrainerView, taken: set[Path]) -> Path | None:
        """Save at an exception, unless in `fast_dev_run` or with NaN/inf in the state."""
        if moment.kind != EXCEPTION or trainer.fast_dev_run or self.path in taken:
            return None
        if not all_finite(eqx.filter(trainer.experiment, eqx.is_array)):
            warnings.warn(
                f"OnExceptionCheckpoint: not saving at global step {trainer.global_step}: the "
                "experiment holds NaN or inf values, which a resume would only repeat. "
                + (f"`{self.path}` is left as it was." if self.path.exists() else ""),
                RuntimeWarning,
                stacklevel=2,
            )
            return None
        return self.path

    def planned_path(self, plan: Path) -> Path:
        return plan

    def write(self, plan: Path, state: CheckpointState) -> None:
        """Write `state` to `plan` (the previous checkpoint there is set aside first)."""
        items, metadata = state.to_checkpoint(
            {"checkpoint": {"name": plan.name, "reason": EXCEPTION, "monitor": None, "score": None}}
        )
        if self._writer is None:
            self._writer = CheckpointWriter()
        try:
            self.dirpath.mkdir(parents=True, exist_ok=True)
            if plan.exists() and jax.process_index() == 0:
                self._replacing = plan.parent / (plan.name + DELETING_SUFFIX)
                shutil.rmtree(self._replacing, ignore_errors=True)
                os.replace(plan, self._replacing)
            self._writer.save(plan, items, metadata)
        except Exception as error:  # noqa: BLE001 - reported; the run's exception goes on
            self._failed(error)

    def wait(self) -> None:
        """Block until the checkpoint is committed (then remove the one it replaced)."""
        if self._writer is None:
            return
        error = self._writer.wait()
        if error is not None:
            self._failed(error)
        elif self._replacing is not None:
            shutil.rmtree(self._replacing, ignore_errors=True)
            self._replacing = None

    def _failed(self, error: BaseException) -> None:
        path = self.path
        if jax.process_index() == 0:
            shutil.rmtree(path.parent / (path.name + ORBAX_TMP_SUFFIX), ignore_errors=True)
            if self._replacing is not None and not path.exists():
                os.replace(self._replacing, path)  # the previous checkpoint stays
        self._replacing = None
        warnings.warn(
            f"OnExceptionCheckpoint: could not write `{path}`: {type(error).__name__}: {error}.",
            RuntimeWarning,
            stacklevel=3,
        )

    def __repr__(self) -> str:
        return f"OnExceptionCheckpoint({str(self.dirpath)!r}, filename={self.filename!r})"
