"""`Progress`: where a run is (epoch, step, batch within the epoch), saved in checkpoints."""

import dataclasses
from typing import Any


@dataclasses.dataclass
class Progress:
    """The Trainer's position in a run.

    - `epoch`: the current (0-based) training epoch.
    - `global_step`: optimisation steps completed over the whole run.
    - `batch_idx`: training batches completed in the current epoch (non-zero only while an
      epoch is running, or when resuming mid-epoch).
    - `validation_runs`: validation runs completed during fit.
    - `epoch_logged`: the current epoch's training metrics are published (its batches are
      done; a signal may still stop its validation, which a resume then runs again without
      publishing them twice).
    - `validation_pending`: a validation of `val_check_interval` is due at this position and
      has not completed (a signal came first): a resume runs it before the next batch.
    - `stage`: what the Trainer is doing: `"train"`, `"validation"`, `"test"`, `"predict"`
      or `None`.
    """

    epoch: int = 0
    global_step: int = 0
    batch_idx: int = 0
    validation_runs: int = 0
    epoch_logged: bool = False
    validation_pending: bool = False
    stage: str | None = None

    def state_dict(self) -> dict[str, Any]:
        state = dataclasses.asdict(self)
        state.pop("stage")
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for field in ("epoch", "global_step", "batch_idx", "validation_runs"):
            setattr(self, field, int(state[field]))
        self.epoch_logged = bool(state.get("epoch_logged", False))
        self.validation_pending = bool(state.get("validation_pending", False))
