"""`Saver`: a component that writes training checkpoints (Kauldron's `ckpt.should_save`).

At every moment a save may happen (an epoch end, a step boundary, a validation within an
epoch, a signal, an exception), the Trainer asks each saver whether it saves (`plan`: the
saver decides and updates its books), then captures the run's `CheckpointState` once, so that
every checkpoint of that moment holds every saver's books as they are after all of that
moment's decisions, and hands it to each saver that said yes (`write`). With several processes
every process takes the same decisions in the same order (a save is collective);
time-triggered decisions are agreed first (`time_due`).
"""

import abc
import dataclasses
from pathlib import Path
from typing import Any

from .._view import TrainerView
from ._checkpoint_state import CheckpointState
from ._find import find_best, find_last

EPOCH = "epoch"
STEP = "step"
VALIDATION = "validation"
INTERRUPT = "interrupt"
EXCEPTION = "exception"


@dataclasses.dataclass(frozen=True)
class SaveMoment:
    """When the Trainer asks: `kind` is `"epoch"` (after `on_train_epoch_end`), `"step"`
    (after a training call), `"validation"` (after a validation of `val_check_interval`,
    within an epoch), `"interrupt"` (a signal, `max_time`) or `"exception"` (`fit` is
    raising, and its state is one a resume can continue from; only savers with
    `saves_on_exception` are asked); `time_due` is this saver's timed trigger as agreed by
    every process (step moments only)."""

    kind: str
    time_due: bool = False


class Saver(abc.ABC):
    """Writes checkpoints of a run when it decides to (see the module docstring).

    `ModelCheckpoint` is the saver users configure; subclass this for another policy.
    """

    #: Where this saver's checkpoints go (`ckpt_path="last"`/`"best"` look there).
    dirpath: Path
    #: The metric `ckpt_path="best"` ranks by, and its direction.
    monitor: str | None = None
    mode: str = "min"

    @property
    def saves_on_steps(self) -> bool:
        """Whether to be asked after every training call (not only at epoch ends)."""
        return False

    @property
    def saves_on_exception(self) -> bool:
        """Whether to be asked when `fit` raises (`OnExceptionCheckpoint`)."""
        return False

    def time_due(self) -> bool:
        """Whether this process's clock says a timed save is due (agreed by the Trainer)."""
        return False

    @abc.abstractmethod
    def plan(self, moment: SaveMoment, trainer: TrainerView, taken: set[Path]) -> Any:
        """Decide whether to save now; return a plan (anything but `None`) to be handed
        back to `write`, or `None`. `taken`: paths other savers planned at this moment."""

    @abc.abstractmethod
    def planned_path(self, plan: Any) -> Path:
        """The directory a plan writes (so other savers of the moment avoid it)."""

    @abc.abstractmethod
    def write(self, plan: Any, state: CheckpointState) -> None:
        """Start writing `state` as `plan` says (in the background)."""

    def find_last(self) -> tuple[Path, dict[str, Any]] | None:
        """The newest valid training checkpoint (a local path and its metadata), or `None`
        if there is none yet (`ckpt_path="last"`)."""
        return find_last(self.dirpath)

    def find_best(self) -> tuple[Path, dict[str, Any]] | None:
        """The valid checkpoint with the best `monitor` score (`ckpt_path="best"`)."""
        assert self.monitor is not None
        return find_best(self.dirpath, self.monitor, self.mode)

    @abc.abstractmethod
    def wait(self) -> None:
        """Block until this saver's writes are committed (and apply its retention)."""
