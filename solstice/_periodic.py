"""`Every`: the one answer to "when does this fire?" (CLU's `PeriodicAction`).

Logging, validation, checkpoints, agreement between processes and the progress bar all fire
every so many steps (or epochs) and/or every so many seconds. `Every` says when, with an
injectable clock, so tests drive time instead of sleeping or patching.
"""

import time
from collections.abc import Callable
from typing import Any

from ._checks import check_int, check_seconds


class Every:
    """Fires every `steps` steps and/or every `seconds` seconds.

    Steps are counted as the caller counts them (global steps, epochs): `due(n)` is true
    when a multiple of `steps` was reached since it last fired (so a fused call that jumps
    from step 8 to step 12 still fires for `steps=10`), or when `seconds` have passed on
    `clock` since it last fired (or since `start`). `fired(n)` records a firing.

    **Arguments:**

    - `steps`: fire at every multiple of this count (`None`: never by count).
    - `seconds`: fire when this much time has passed (a number or a `datetime.timedelta`;
      `None`: never by time).
    - `clock`: the time source, `time.monotonic` by default (looked up at each call, so a
      patched `time.monotonic` is seen); pass a function to drive time in tests.

    **Example:**

    ```python
    save = Every(steps=100, seconds=600)
    save.start()
    for step in range(1, 1001):
        train()
        if save.due(step):
            checkpoint()
            save.fired(step)
    ```
    """

    def __init__(
        self,
        steps: int | None = None,
        seconds: Any = None,
        *,
        clock: Callable[[], float] | None = None,
    ):
        check_int("Every(steps=...)", steps, minimum=1, allow_none=True)
        self.steps = steps
        self.seconds = check_seconds("Every(seconds=...)", seconds)
        if clock is None:
            clock = _monotonic
        if not callable(clock):
            raise TypeError(
                f"`Every(clock=...)` must be a function returning seconds, got {clock!r}."
            )
        self.clock = clock
        self.last_step = 0
        self.last_time: float | None = None

    def start(self, step: int = 0) -> None:
        """Begin counting: time from now, steps after `step`."""
        self.last_step = step
        self.last_time = self.clock() if self.seconds is not None else None

    def step_due(self, step: int) -> bool:
        """Whether a multiple of `steps` lies in `(last_step, step]`."""
        return self.crossed(self.last_step, step)

    def crossed(self, start: int, stop: int) -> bool:
        """Whether a multiple of `steps` lies in `(start, stop]` (a call taking the count
        from `start` to `stop`), whatever happened before."""
        n = self.steps
        return n is not None and stop // n > start // n

    def time_due(self) -> bool:
        """Whether `seconds` have passed since the last firing (or `start`)."""
        return (
            self.seconds is not None
            and self.last_time is not None
            and self.clock() - self.last_time >= self.seconds
        )

    def due(self, step: int) -> bool:
        """`step_due(step) or time_due()`."""
        return self.step_due(step) or self.time_due()

    def fired(self, step: int) -> None:
        """Record a firing at `step`, now."""
        self.last_step = step
        if self.seconds is not None:
            self.last_time = self.clock()

    def __repr__(self) -> str:
        return f"Every(steps={self.steps}, seconds={self.seconds})"


def _monotonic() -> float:
    return time.monotonic()
