"""`PopulationEarlyStopping`: stop each member of a `Population` when its metric stalls."""

import logging
from typing import Any

import numpy as np

from .._checks import check_int
from .._population import Population
from .._view import TrainerView
from ._population_monitor import PopulationMonitor

log = logging.getLogger("solstice")


class PopulationEarlyStopping(PopulationMonitor):
    """Early stopping per member of a `solstice.Population`: a member whose `monitor` has
    not improved by more than `min_delta` for `patience` checks is stopped (its arrays are
    kept exactly from then on, `Population.with_active`) while the others train on; `fit`
    stops when every member has stopped.

    `monitor` names the member metric with its stage: `"val/loss"` reads
    `val/member_{i}/loss` for member `i`, after every validation of a fit (a metric that is
    not `val/*`, such as `train/loss_epoch`, at every epoch end). Its state (wait counts,
    best scores, stopped epochs) is saved in checkpoints, and the population's `active`
    flags with the experiment, so a resumed run stops members exactly where the
    uninterrupted one would.

    **Arguments:**

    - `monitor`: the member metric, e.g. `"val/loss"`.
    - `mode`: `"min"` or `"max"`.
    - `patience`: checks without improvement before a member stops.
    - `min_delta`: the least change that counts as an improvement.

    **Attributes:** `wait_counts`, `best_scores`, `best_epochs`, `stopped_epochs` (one per
    member; `None` while the member trains).

    **Example:**

    ```python
    trainer = solstice.Trainer(
        max_epochs=50, callbacks=[PopulationEarlyStopping("val/loss", patience=3)]
    )
    ```
    """

    def __init__(
        self,
        monitor: str = "val/loss",
        mode: str = "min",
        patience: int = 3,
        min_delta: float = 0.0,
    ):
        super().__init__(monitor, mode, "PopulationEarlyStopping", min_delta)
        check_int("`PopulationEarlyStopping(patience=...)`", patience)
        self.patience = patience
        self.wait_counts: list[int] = []
        self.stopped_epochs: list[int | None] = []

    @property
    def state_key(self) -> str:
        return f"PopulationEarlyStopping{{monitor={self.monitor!r}, mode={self.mode!r}}}"

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "wait_counts": list(self.wait_counts),
            "stopped_epochs": list(self.stopped_epochs),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.wait_counts = [int(w) for w in state["wait_counts"]]
        self.stopped_epochs = list(state["stopped_epochs"])

    def on_fit_start(self, trainer: TrainerView, experiment: Any) -> None:
        size = self.population(experiment).size
        if len(self.wait_counts) != size:
            self.wait_counts = [0] * size
            self.stopped_epochs = [None] * size
        super().on_fit_start(trainer, experiment)

    def checked(
        self, trainer: TrainerView, population: Population, improved: list[int], active: Any
    ) -> None:
        now_active = active.copy()
        for i in range(population.size):
            if not active[i]:
                continue
            self.wait_counts[i] = 0 if i in improved else self.wait_counts[i] + 1
            if self.wait_counts[i] >= self.patience:
                now_active[i] = False
                self.stopped_epochs[i] = trainer.current_epoch
                log.info(
                    "PopulationEarlyStopping: member %d stopped at epoch %d (`%s` best %.6g at "
                    "epoch %s).",
                    i,
                    trainer.current_epoch,
                    self.key(i),
                    self.best_scores[i],
                    self.best_epochs[i],
                )
        if not np.array_equal(now_active, active):
            trainer.replace_experiment(
                population.with_active(now_active), by="PopulationEarlyStopping"
            )
        if not now_active.any():
            trainer.stop(
                f"Every member of the population stopped improving `{self.monitor}`.",
                by="PopulationEarlyStopping",
            )
