"""`EpochGate`: times the epochs of one running `Trainer.fit`, one at a time."""

import threading
from collections.abc import Callable

import equinox as eqx
import jax
from _common import Contestant, timed

import solstice
from solstice.callbacks import Callback


class EpochGate(Callback):
    """Holds every epoch of a running `fit` until `release` lets it go, as the peers' gates do.

    `fit` runs in a background thread for as many epochs as asked. An epoch is timed from its
    release to the end of `on_train_epoch_end`, after its metrics are on the host and the
    experiment's arrays are ready: one epoch of a long run, without `fit`'s once-per-call
    set-up (placing the experiment, starting the hooks).
    """

    def __init__(self):
        self._go = threading.Semaphore(0)
        self._done = threading.Semaphore(0)
        self.error: BaseException | None = None

    def on_train_epoch_start(self, trainer, experiment):
        self._go.acquire()

    def on_train_epoch_end(self, trainer, experiment):
        jax.block_until_ready(eqx.filter(trainer.experiment, eqx.is_array))
        self._done.release()

    def trainer(self, steps_per_epoch: int, callbacks=(), **settings) -> solstice.Trainer:
        """A Trainer gated by this gate: as many epochs as released, no progress bar, no
        loggers, one log per epoch, no sanity validation; `settings` add to or override
        these (`devices=1`, `accumulate_grad_batches=4`, ...); `callbacks` run before the
        gate."""
        defaults = dict(
            max_epochs=10**6,
            enable_progress_bar=False,
            loggers=[],
            log_every_n_steps=steps_per_epoch,
            num_sanity_val_steps=0,
        )
        return solstice.Trainer(callbacks=[*callbacks, self], **{**defaults, **settings})

    def start(self, trainer: solstice.Trainer, experiment, datamodule) -> None:
        def run() -> None:
            try:
                trainer.fit(experiment, datamodule)
            except BaseException as error:  # noqa: BLE001 - re-raised by `release`
                self.error = error
            finally:
                self._done.release()

        self._trainer = trainer
        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def contestant(
        self,
        name: str,
        trainer: solstice.Trainer,
        experiment,
        datamodule,
        samples_per_epoch: int,
        timer: Callable = timed,
    ) -> Contestant:
        """Start `trainer.fit` gated, run its first epoch (compiling), and return a
        `Contestant` whose epoch is the next released one (`close` ends the fit)."""
        self.start(trainer, experiment, datamodule)
        self.release()  # warm-up: compile

        def epoch() -> int:
            self.release()
            return samples_per_epoch

        contestant = Contestant(name, timer(epoch))
        contestant.close = self.close  # type: ignore[attr-defined]
        return contestant

    def release(self) -> None:
        """Run one epoch and wait for its end."""
        self._go.release()
        self._done.acquire()
        if self.error is not None:
            raise RuntimeError("solstice fit failed") from self.error

    def close(self) -> None:
        self._trainer.should_stop = True  # the released epoch stops after one call
        self._go.release()
        self._thread.join()
