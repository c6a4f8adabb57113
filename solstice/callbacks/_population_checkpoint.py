"""`PopulationCheckpoint`: the best experiment of each member of a `Population`, on disk."""

import shutil
from pathlib import Path
from typing import Any

import jax

from .._population import Population
from .._view import TrainerView
from ..checkpointing._export import save
from ..storage._paths import check_path, is_remote
from ._population_monitor import PopulationMonitor


class PopulationCheckpoint(PopulationMonitor):
    """Keeps, for each member of a `solstice.Population`, the experiment of its best check
    of `monitor` (`"val/loss"` reads `val/member_{i}/loss`): whenever member `i` improves,
    `population.member(i)` is saved with `solstice.save` (atomic, never pickled) to
    `dirpath/member_{i}/epoch={epoch}-step={step}`, and its previous best is removed.

    Load one with `solstice.load(checkpoint.best_paths[i], like=make_member(i))`. The best
    scores and paths are saved in the run's checkpoints, so a resumed run goes on from them.
    Writes synchronously, to a local (or shared) directory, in a run of one process (members
    are small: that is what populations are for); a storage URL (`s3://...`) and a run of
    several processes are refused with the alternative (`ModelCheckpoint`, which keeps the
    whole population).

    **Arguments:**

    - `dirpath`: the directory (created if missing).
    - `monitor`: the member metric, e.g. `"val/loss"`.
    - `mode`: `"min"` or `"max"`.

    **Attributes:** `best_paths`, `best_scores`, `best_epochs` (one per member; `""` /
    the worst score / `None` before a member's first check).

    **Example:**

    ```python
    checkpoint = PopulationCheckpoint("members", monitor="val/accuracy", mode="max")
    population = solstice.Trainer(max_epochs=20, callbacks=[checkpoint]).fit(population, dm)
    best_3 = solstice.load(checkpoint.best_paths[3], like=population.member(3))
    ```
    """

    def __init__(self, dirpath: Any, monitor: str = "val/loss", mode: str = "min"):
        super().__init__(monitor, mode, "PopulationCheckpoint")
        text = check_path(dirpath, "PopulationCheckpoint(dirpath=...)")
        if is_remote(text):
            raise ValueError(
                f"`PopulationCheckpoint(dirpath={text!r})`: per-member checkpoints are written "
                "to a local or shared directory, not to remote storage. Pass a local path, or "
                f"keep the whole population there with `ModelCheckpoint({text!r}, "
                "monitor=...)` and take members with `population.member(i)` after loading."
            )
        self.dirpath = Path(text).absolute()
        if self.dirpath.exists() and not self.dirpath.is_dir():
            raise ValueError(
                f"`PopulationCheckpoint(dirpath={str(dirpath)!r})` is a file; pass a directory."
            )
        self.best_paths: list[str] = []

    @property
    def state_key(self) -> str:
        return f"PopulationCheckpoint{{dirpath={str(self.dirpath)!r}, monitor={self.monitor!r}}}"

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "best_paths": list(self.best_paths)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.best_paths = [str(p) for p in state["best_paths"]]

    def on_fit_start(self, trainer: TrainerView, experiment: Any) -> None:
        if jax.process_count() > 1:
            raise ValueError(
                f"`PopulationCheckpoint` writes each member's best from one process, but this "
                f"run has {jax.process_count()} processes (taking a member out of the "
                "population is a computation every process would have to join). Use "
                "`ModelCheckpoint(monitor='val/member_{i}/...')`, which saves the whole "
                "population from every process, and `population.member(i)` after loading."
            )
        size = self.population(experiment).size
        if len(self.best_paths) != size:
            self.best_paths = [""] * size
        super().on_fit_start(trainer, experiment)

    def checked(
        self, trainer: TrainerView, population: Population, improved: list[int], active: Any
    ) -> None:
        for i in improved:
            folder = self.dirpath / f"member_{i}"
            path = folder / f"epoch={trainer.current_epoch}-step={trainer.global_step}"
            if jax.process_index() == 0:
                folder.mkdir(parents=True, exist_ok=True)
                if path.exists():  # written by an interrupted run, not in the restored state
                    shutil.rmtree(path)
                save(path, population.member(i))
                if self.best_paths[i] and Path(self.best_paths[i]) != path:
                    shutil.rmtree(self.best_paths[i], ignore_errors=True)
            self.best_paths[i] = str(path)
