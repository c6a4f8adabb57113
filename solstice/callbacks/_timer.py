"""`Timer`: throughput (steps/s, samples/s) and compile time, reported apart."""

import logging
import time
from typing import Any

from ._callback import Callback
from ._compile_timer import CompileTimer
from ._intervals import is_train_interval

_log = logging.getLogger("solstice")


class Timer(Callback):
    """Measures training throughput and compile time, and logs both.

    At every training log interval it logs `time/steps_per_sec` and `time/samples_per_sec`
    over the interval, with any compilation that happened inside the interval subtracted, so
    the numbers are steady-state. At each epoch end it logs `time/epoch_secs` and the
    `compile/*` totals (tracing, lowering, XLA compile, persistent-cache hits). At fit end it
    logs a summary, including compile time per step function, to the `"solstice"` logger.

    Wall-clock time between log intervals measures dispatch; because dispatch can run only a
    bounded distance ahead of the device, over an interval it equals device throughput.

    **Attributes** (after fit): `compile_stats` (a `CompileStats`), `steady_steps_per_sec`,
    `steady_samples_per_sec`, `fit_secs`.

    **Example:**

    ```python
    timer = Timer()
    trainer = solstice.Trainer(max_epochs=3, callbacks=[timer])
    trainer.fit(experiment, datamodule)
    print(timer.steady_steps_per_sec, timer.compile_stats.by_function)
    ```
    """

    def __init__(self) -> None:
        self._compile = CompileTimer()
        self.compile_stats = self._compile.stats
        self.steady_steps_per_sec: float | None = None
        self.steady_samples_per_sec: float | None = None
        self.fit_secs: float | None = None
        self._fit_start = 0.0
        self._mark: tuple[float, int, float] | None = None  # (time, step, compile secs)
        self._steady: list[tuple[float, int]] = []  # (seconds, steps) per interval

    def _now(self, trainer) -> tuple[float, int, float]:
        return time.perf_counter(), trainer.global_step, self._compile.stats.total_secs

    def on_fit_start(self, trainer, experiment) -> None:
        self._compile.start()
        self._fit_start = time.perf_counter()
        self._steady = []

    def on_train_epoch_start(self, trainer, experiment) -> None:
        self._epoch_start = time.perf_counter()
        self._mark = self._now(trainer)

    def on_log(self, trainer, experiment, metrics: dict[str, Any], step: int) -> None:
        if self._mark is None or trainer.progress.stage != "train":
            return
        if not is_train_interval(metrics):
            return
        now = self._now(trainer)
        steps = now[1] - self._mark[1]
        secs = (now[0] - self._mark[0]) - (now[2] - self._mark[2])
        self._mark = now
        if steps <= 0 or secs <= 0:
            return
        self._steady.append((secs, steps))
        trainer.log_metrics(self.interval_metrics(trainer, steps, secs), step)

    def interval_metrics(self, trainer, steps: int, secs: float) -> dict[str, Any]:
        """What is logged for a log interval of `steps` steps that ran in `secs` seconds
        (compilation excluded)."""
        out = {"time/steps_per_sec": steps / secs}
        batch = trainer.train_batch_size
        if batch:
            out["time/samples_per_sec"] = steps * batch / secs
        return out

    def on_train_epoch_end(self, trainer, experiment) -> None:
        out = {"time/epoch_secs": time.perf_counter() - self._epoch_start}
        out.update(self._compile.stats.as_metrics())
        trainer.log_metrics(out, trainer.global_step)
        self._mark = None

    def on_fit_end(self, trainer, experiment) -> None:
        self._finish(trainer)

    def on_exception(self, trainer, experiment, exception) -> None:
        self._finish(trainer)

    def _finish(self, trainer) -> None:
        self._compile.stop()
        self.compile_stats = self._compile.stats
        self.fit_secs = time.perf_counter() - self._fit_start
        # Steady state: every interval but the first of the run (warm-up, caches).
        intervals = self._steady[1:] or self._steady
        secs = sum(s for s, _ in intervals)
        steps = sum(n for _, n in intervals)
        if secs > 0:
            self.steady_steps_per_sec = steps / secs
            batch = getattr(trainer, "train_batch_size", None)
            self.steady_samples_per_sec = steps * batch / secs if batch else None
        per_fn = ", ".join(
            f"{name} {secs:.2f}s" for name, secs in sorted(self.compile_stats.by_function.items())
        )
        _log.info(
            "Timer: fit %.2f s; compile %.2f s (%d compilations, %d cache hits: %s); "
            "steady state %s steps/s",
            self.fit_secs,
            self.compile_stats.total_secs,
            self.compile_stats.compilations,
            self.compile_stats.cache_hits,
            per_fn or "none",
            f"{self.steady_steps_per_sec:.1f}" if self.steady_steps_per_sec else "n/a",
        )
