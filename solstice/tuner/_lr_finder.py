"""`LRFinder`: the curve of a learning-rate sweep, its suggestion and its plot."""

import dataclasses
import warnings
from typing import Any

import numpy as np

MODES = ("exponential", "linear")


def sweep_rates(min_lr: float, max_lr: float, num_training: int, mode: str) -> np.ndarray:
    """The rate of each of the sweep's `num_training` steps: from `min_lr` at the first to
    `max_lr` at the last, evenly spaced on a log scale (`"exponential"`) or a linear one."""
    t = np.arange(num_training, dtype=np.float64) / max(num_training - 1, 1)
    if mode == "exponential":
        return min_lr * (max_lr / min_lr) ** t
    return min_lr + t * (max_lr - min_lr)


def smooth(losses: np.ndarray, beta: float) -> np.ndarray:
    """Lightning's smoothing: an exponential moving average with factor `beta`, divided by
    `1 - beta ** (i + 1)` so that the first points are not biased towards 0."""
    smoothed = np.empty(len(losses), np.float64)
    average = 0.0
    for i, loss in enumerate(np.asarray(losses, np.float64)):
        average = beta * average + (1 - beta) * loss
        smoothed[i] = average / (1 - beta ** (i + 1))
    return smoothed


def divergence(smoothed: np.ndarray, threshold: float | None) -> int | None:
    """The first step (0-based, not the first) whose smoothed loss is above `threshold`
    times the best one before it, or not finite (Lightning's early stop, which also stops
    on NaN/inf); `None` if there is none or `threshold` is `None`."""
    if threshold is None or len(smoothed) == 0:
        return None
    best = smoothed[0]
    for i in range(1, len(smoothed)):
        if not np.isfinite(smoothed[i]) or smoothed[i] > threshold * best:
            return i
        best = min(best, smoothed[i])
    return None


@dataclasses.dataclass
class LRFinder:
    """The result of `solstice.tuner.lr_find`: the loss of each step of the sweep against its
    learning rate.

    **Attributes:**

    - `lrs`: the learning rate each step used (as the optimizer applied it).
    - `losses`: the smoothed training loss after each step (see `lr_find`'s `beta`).
    - `raw_losses`: each step's own loss, as its metrics computed it.
    - `mode`, `min_lr`, `max_lr`, `num_training`: the sweep's settings.
    - `early_stopped`: whether the sweep stopped because the loss diverged; the curve then
      ends at the first diverged step, so it has fewer than `num_training` points.

    **Example:**

    ```python
    finder = solstice.tuner.lr_find(trainer, experiment, datamodule)
    lr = finder.suggestion()
    finder.plot(suggest=True).savefig("lr_find.png")
    ```
    """

    lrs: list[float]
    losses: list[float]
    raw_losses: list[float]
    mode: str
    min_lr: float
    max_lr: float
    num_training: int
    early_stopped: bool
    _optimal_idx: int | None = dataclasses.field(default=None, repr=False)

    @property
    def results(self) -> dict[str, list[float]]:
        """`{"lr": lrs, "loss": losses}`, as Lightning's `lr_finder.results`."""
        return {"lr": list(self.lrs), "loss": list(self.losses)}

    def suggestion(self, skip_begin: int = 10, skip_end: int = 1) -> float | None:
        """The learning rate where the smoothed loss falls fastest (Lightning's suggestion):
        the point of most negative gradient of `losses` along the plot's axis, among the
        finite points after skipping `skip_begin` at the start and `skip_end` at the end.

        The axis is `log(lr)` in `"exponential"` mode (as Lightning's first finder did, and
        as `plot` draws it) and `lr` in `"linear"` mode. Against `lr` itself, an exponential
        sweep's first points, a millionth of a unit apart, turn the noise of the loss into
        the steepest slopes, and the suggestion into the smallest rates.

        **Returns:** that rate, or `None` (with a `RuntimeWarning`) when fewer than two
        points are left: sweep longer (`num_training`) or skip fewer.
        """
        stop = len(self.losses) - skip_end
        losses = np.asarray(self.losses[skip_begin:stop], np.float64)
        lrs = np.asarray(self.lrs[skip_begin:stop], np.float64)
        indices = np.arange(len(self.losses))[skip_begin:stop]
        finite = np.isfinite(losses)
        losses, lrs, indices = losses[finite], lrs[finite], indices[finite]
        if len(losses) < 2:
            self._optimal_idx = None
            warnings.warn(
                f"LRFinder.suggestion: {len(losses)} finite point(s) are left of the "
                f"{len(self.losses)} of the curve after skipping {skip_begin} at the start "
                f"and {skip_end} at the end; a gradient needs 2. Increase `num_training` "
                "(or the dataset), or lower `skip_begin`/`skip_end`.",
                RuntimeWarning,
                stacklevel=2,
            )
            return None
        axis = np.log(lrs) if self.mode == "exponential" else lrs
        self._optimal_idx = int(indices[int(np.argmin(np.gradient(losses, axis)))])
        return self.lrs[self._optimal_idx]

    def plot(self, suggest: bool = False, show: bool = False, ax: Any = None) -> Any:
        """Plot the smoothed loss against the learning rate (log scale in `"exponential"`
        mode) with matplotlib (`pip install 'solstice[plot]'`).

        **Arguments:**

        - `suggest`: mark the suggested rate with a red point.
        - `show`: call `plt.show()`.
        - `ax`: a matplotlib `Axes` to draw on; default a new figure.

        **Returns:** the matplotlib figure (save it with `fig.savefig(path)`).
        """
        try:
            import matplotlib.pyplot as plt
        except ImportError as error:  # pragma: no cover - depends on the environment
            raise ImportError(
                "`LRFinder.plot` needs matplotlib: `pip install 'solstice[plot]'`."
            ) from error
        if ax is None:
            fig, ax = plt.subplots()
        else:
            fig = ax.figure
        ax.plot(self.lrs, self.losses)
        if self.mode == "exponential":
            ax.set_xscale("log")
        ax.set_xlabel("Learning rate")
        ax.set_ylabel("Loss")
        if suggest and self.suggestion() is not None and self._optimal_idx is not None:
            i = self._optimal_idx
            ax.plot(self.lrs[i], self.losses[i], markersize=10, marker="o", color="red")
        if show:
            plt.show()
        return fig
