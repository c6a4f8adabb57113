"""What `PopulationEarlyStopping` and `PopulationCheckpoint` share: one metric read per
member of a `solstice.Population`, and per-member best scores."""

from typing import Any

import numpy as np

from .._population import Population
from .._population_metrics import member_key
from .._view import TrainerView
from ._callback import Callback
from ._monitor import better, check_mode, worst


class PopulationMonitor(Callback):
    """Reads `monitor` for every member (`val/loss` -> `val/member_{i}/loss`) after each
    validation of a fit (or, for a metric that is not `val/*`, at each epoch end) and keeps
    each member's best score and epoch. Subclasses act in `checked`."""

    def __init__(self, monitor: str, mode: str, owner: str, min_delta: float = 0.0):
        check_mode(mode, owner)
        if not isinstance(monitor, str) or "/" not in monitor:
            raise ValueError(
                f"`{owner}(monitor={monitor!r})` takes a stage and a member metric, e.g. "
                "'val/loss' (read as `val/member_{i}/loss` for each member)."
            )
        if isinstance(min_delta, bool) or not isinstance(min_delta, (int, float)) or min_delta < 0:
            raise ValueError(
                f"`{owner}(min_delta={min_delta!r})` must be a number >= 0: the least change "
                "that counts as an improvement."
            )
        self.min_delta = float(min_delta)
        self.owner = owner
        self.monitor = monitor
        self.mode = mode
        self.best_scores: list[float] = []
        self.best_epochs: list[int | None] = []

    def key(self, index: int) -> str:
        """The metric read for member `index`, e.g. `val/member_3/loss`."""
        stage, name = self.monitor.split("/", 1)
        return f"{stage}/{member_key(index, name)}"

    def required_metrics(self) -> tuple[str, ...]:
        return (self.key(0),)

    def state_dict(self) -> dict[str, Any]:
        return {"best_scores": list(self.best_scores), "best_epochs": list(self.best_epochs)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_scores = [float(s) for s in state["best_scores"]]
        self.best_epochs = list(state["best_epochs"])

    def population(self, experiment: Any) -> Population:
        if not isinstance(experiment, Population):
            raise TypeError(
                f"`{self.owner}` watches the members of a `solstice.Population`, but the "
                f"experiment is a `{type(experiment).__name__}`. Use `EarlyStopping` / "
                "`ModelCheckpoint` for a single experiment."
            )
        return experiment

    def on_fit_start(self, trainer: TrainerView, experiment: Any) -> None:
        size = self.population(experiment).size
        if len(self.best_scores) != size:
            self.best_scores = [worst(self.mode)] * size
            self.best_epochs = [None] * size

    def on_validation_end(self, trainer: TrainerView, experiment: Any) -> None:
        if trainer.fitting and self.monitor.startswith("val/"):
            self._check(trainer, experiment)

    def on_train_epoch_end(self, trainer: TrainerView, experiment: Any) -> None:
        if not self.monitor.startswith("val/"):
            self._check(trainer, experiment)

    def _check(self, trainer: TrainerView, experiment: Any) -> None:
        population = self.population(experiment)
        metrics = trainer.callback_metrics
        missing = [self.key(i) for i in range(population.size) if self.key(i) not in metrics]
        if missing:
            available = ", ".join(f"`{k}`" for k in sorted(metrics)[:20])
            raise ValueError(
                f"`{self.owner}` monitors `{missing[0]}`, which the Trainer did not produce. "
                f"Metrics it produced include: {available}. Pass `monitor=` as "
                "'<stage>/<member metric>', e.g. 'val/loss'."
            )
        # replicated: every device, of every process, holds all of it
        active = np.asarray(population.active.addressable_data(0))
        scores = [float(metrics[self.key(i)]) for i in range(population.size)]
        sign = 1.0 if self.mode == "min" else -1.0
        improved = [
            i
            for i, score in enumerate(scores)
            if active[i] and better(score + sign * self.min_delta, self.best_scores[i], self.mode)
        ]
        for i in improved:
            self.best_scores[i] = scores[i]
            self.best_epochs[i] = trainer.current_epoch
        self.checked(trainer, population, improved, active)

    def checked(
        self, trainer: TrainerView, population: Population, improved: list[int], active: Any
    ) -> None:
        """Act on one check, after the best scores are updated: the members `improved` beat
        their best; `active` (numpy bools) are the members that were training."""
