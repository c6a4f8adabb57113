"""`Agreement`: decisions that each process takes alone (a signal it received, its own clock
saying a timed checkpoint is due), made the same in every process.

A checkpoint save is collective: with several processes, one that saves at a step where
another does not waits for it forever. Signals and clocks are per process, so the Trainer
does not act on them directly there: every process brings its own view to *agreement
points*, the same steps in every process, and all act on the combined view together.
"""

import time
from collections.abc import Sequence
from typing import Any

import numpy as np

# Agreement points come about every this many seconds of training (the number of steps
# between them is re-agreed at each one, from process 0's pace), so a preempted job acts on
# its SIGTERM within about this long, and the cost (one small collective, which waits for the
# steps in flight) is paid about once per interval.
AGREE_EVERY_SECONDS = 1.0
MAX_STEPS_BETWEEN = 1000


class Agreement:
    """Agreement points between processes, at global steps every process computes alike.

    With one process every step is a point and nothing is exchanged.

    **Example:**

    ```python
    agreement = Agreement(placement, first_step=trainer.global_step)
    if agreement.due(trainer.global_step):
        signum, due = agreement.agree(trainer.global_step, local_signum, [cb.time_due()])
    ```
    """

    def __init__(self, placement: Any, first_step: int):
        self.multi_process = placement.multi_process
        self._next = first_step + 1
        self._last = (first_step, time.monotonic())

    def due(self, step: int) -> bool:
        """Whether the boundary after global step `step` is an agreement point."""
        return not self.multi_process or step >= self._next

    def agree(self, step: int, signum: int, due: Sequence[bool]) -> tuple[int, list[bool]]:
        """The largest signal number any process received (0: none), and for each timed
        checkpoint callback whether any process's clock says its save is due (`due`: this
        process's view, one per callback). With several processes this is a collective: call
        it at the same point in every process (`due`, or outside the training steps)."""
        if not self.multi_process:
            return signum, list(due)
        from jax.experimental import multihost_utils

        last_step, last_time = self._last
        now = time.monotonic()
        per_step = (now - last_time) / max(1, step - last_step)
        steps = int(np.clip(AGREE_EVERY_SECONDS / max(per_step, 1e-9), 1, MAX_STEPS_BETWEEN))
        mine = np.asarray([signum, steps, *due], np.int32)
        views = np.asarray(multihost_utils.process_allgather(mine))  # (processes, 2 + callbacks)
        self._next = step + int(views[0, 1])  # process 0's pace, the same for everyone
        self._last = (step, time.monotonic())
        return int(views[:, 0].max()), [bool(x) for x in views[:, 2:].max(axis=0)]
