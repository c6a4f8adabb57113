"""`CompileTimer`: how long JAX spent tracing, lowering and compiling, read from its own events.

JAX reports every compilation through `jax.monitoring`:

- `/jax/core/compile/jaxpr_trace_duration`: tracing a Python function to a jaxpr;
- `/jax/core/compile/jaxpr_to_mlir_module_duration`: lowering the jaxpr to StableHLO;
- `/jax/core/compile/backend_compile_duration`: XLA compilation, or the load of an executable
  from the persistent compilation cache on a hit;
- `/jax/compilation_cache/cache_hits` and `/cache_misses`: persistent-cache look-ups, and
  `/jax/compilation_cache/compile_time_saved_sec` for each hit.

A `CompileTimer` listens to these while it is active and sums them. The listeners are
process-wide, so a timer counts every compilation in the process while it runs, whatever thread
or Trainer triggers it.
"""

import dataclasses
import threading
from typing import Any

import jax.monitoring

TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"
LOWER_EVENT = "/jax/core/compile/jaxpr_to_mlir_module_duration"
BACKEND_EVENT = "/jax/core/compile/backend_compile_duration"
CACHE_HIT_EVENT = "/jax/compilation_cache/cache_hits"
CACHE_MISS_EVENT = "/jax/compilation_cache/cache_misses"
CACHE_SAVED_EVENT = "/jax/compilation_cache/compile_time_saved_sec"


@dataclasses.dataclass
class CompileStats:
    """Compilation time in seconds, summed over the events seen.

    - `trace_secs`: tracing Python to jaxprs (also paid when only the cache is hit).
    - `lower_secs`: lowering jaxprs to StableHLO.
    - `backend_secs`: XLA compilation, including loads from the persistent cache.
    - `compilations`: backend compilations (or cache loads) seen.
    - `cache_hits`, `cache_misses`: persistent compilation cache look-ups.
    - `saved_secs`: compile time the persistent cache saved, as JAX estimates it.
    - `by_function`: `backend_secs` split by the compiled function's name (`"jit(step)"`).
    """

    trace_secs: float = 0.0
    lower_secs: float = 0.0
    backend_secs: float = 0.0
    compilations: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    saved_secs: float = 0.0
    by_function: dict[str, float] = dataclasses.field(default_factory=dict)

    @property
    def total_secs(self) -> float:
        """Tracing + lowering + compiling: the time a step spent not running."""
        return self.trace_secs + self.lower_secs + self.backend_secs

    def as_metrics(self, prefix: str = "compile/") -> dict[str, float]:
        """The scalars as a dict for a `solstice.Logger`, e.g. `{"compile/total_secs": 1.2}`."""
        return {
            f"{prefix}total_secs": self.total_secs,
            f"{prefix}trace_secs": self.trace_secs,
            f"{prefix}lower_secs": self.lower_secs,
            f"{prefix}backend_secs": self.backend_secs,
            f"{prefix}compilations": float(self.compilations),
            f"{prefix}cache_hits": float(self.cache_hits),
            f"{prefix}cache_misses": float(self.cache_misses),
            f"{prefix}saved_secs": self.saved_secs,
        }


class CompileTimer:
    """Sums JAX's compilation events between `start()` and `stop()` (or inside `with`).

    Cheap: a few dictionary updates per compilation, nothing per step. Thread-safe: a
    compilation on another thread (the feeder's) is counted too. Several timers may run at
    once; each sees every event.

    **Example:**

    ```python
    timer = CompileTimer()
    with timer:
        experiment = trainer.fit(experiment, datamodule)
    print(f"compiling took {timer.stats.total_secs:.2f} s "
          f"({timer.stats.cache_hits} persistent-cache hits)")
    logger.log_metrics(timer.stats.as_metrics(), step=trainer.global_step)
    ```
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stats = CompileStats()
        self._active = False

    # ---- listeners (called by jax.monitoring on whatever thread compiles)
    def _on_duration(self, event: str, duration: float, **kwargs: Any) -> None:
        with self._lock:
            stats = self._stats
            if event == BACKEND_EVENT:
                stats.backend_secs += duration
                stats.compilations += 1
                name = str(kwargs.get("fun_name", "?"))
                stats.by_function[name] = stats.by_function.get(name, 0.0) + duration
            elif event == TRACE_EVENT:
                stats.trace_secs += duration
            elif event == LOWER_EVENT:
                stats.lower_secs += duration
            elif event == CACHE_SAVED_EVENT:
                stats.saved_secs += duration

    def _on_event(self, event: str, **kwargs: Any) -> None:
        if event == CACHE_HIT_EVENT:
            with self._lock:
                self._stats.cache_hits += 1
        elif event == CACHE_MISS_EVENT:
            with self._lock:
                self._stats.cache_misses += 1

    # ---- control
    @property
    def active(self) -> bool:
        return self._active

    def start(self) -> "CompileTimer":
        """Begin listening (idempotent). Returns the timer."""
        if not self._active:
            jax.monitoring.register_event_duration_secs_listener(self._on_duration)  # type: ignore[arg-type]
            jax.monitoring.register_event_listener(self._on_event)
            self._active = True
        return self

    def stop(self) -> CompileStats:
        """Stop listening (idempotent). Returns the stats so far."""
        if self._active:
            jax.monitoring.unregister_event_duration_listener(self._on_duration)  # type: ignore[arg-type]
            jax.monitoring.unregister_event_listener(self._on_event)
            self._active = False
        return self.stats

    def reset(self) -> None:
        """Forget what was counted (keeps listening if active)."""
        with self._lock:
            self._stats = CompileStats()

    @property
    def stats(self) -> CompileStats:
        """A snapshot of the sums so far."""
        with self._lock:
            return dataclasses.replace(self._stats, by_function=dict(self._stats.by_function))

    def __enter__(self) -> "CompileTimer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
