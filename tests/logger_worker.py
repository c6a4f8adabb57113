"""A small training run with CSV and TensorBoard loggers, started as a subprocess by the
logger reliability tests.

    python tests/logger_worker.py OUT_DIR [--resume] [--max-epochs N] [--hung]
                                  [--announce-step N] [--flush-timeout S]

Checkpoints go to OUT_DIR/ckpts (every step, keeping the most recent), metrics to
OUT_DIR/csv and OUT_DIR/tb. `--resume` continues from the newest valid checkpoint
(`ckpt_path="last"`). `--hung` adds a logger whose `log_metrics` never returns. At
`--announce-step` the run prints `STEP <n>`, so a test can signal it. At the end it writes
`trainer.history`'s lists to OUT_DIR/history.json and prints `DONE`.
"""

import argparse
import json
import os
import sys
import threading

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from helpers import blobs_datamodule, make_mlp_experiment  # noqa: E402

import solstice  # noqa: E402
from solstice.callbacks import Callback, LoggingCallback, ModelCheckpoint  # noqa: E402


class HungLogger(solstice.Logger):
    """Its first `log_metrics` never returns."""

    def log_metrics(self, metrics, step):
        print("HUNG", flush=True)
        threading.Event().wait()

    def __repr__(self):
        return "HungLogger()"


class Announce(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, experiment, batch, batch_idx):
        if trainer.global_step == self.step:
            print(f"STEP {self.step}", flush=True)


def make_experiment():
    return make_mlp_experiment(seed=0, in_size=8, num_classes=4)


def trainer_kwargs(max_epochs: int) -> dict:
    return dict(max_epochs=max_epochs, log_every_n_steps=1, devices=1, enable_progress_bar=False)


def history_lists(history) -> dict:
    """`history`'s lists, as JSON would give them back."""
    return json.loads(
        json.dumps({"metrics": history.metrics, "steps": history.steps, "epochs": history.epochs})
    )


def make_loggers(out: str) -> list:
    return [
        solstice.CSVLogger(os.path.join(out, "csv")),
        solstice.TensorBoardLogger(os.path.join(out, "tb"), flush_secs=0.05),
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--max-epochs", type=int, default=6)
    parser.add_argument("--hung", action="store_true")
    parser.add_argument("--announce-step", type=int)
    parser.add_argument("--flush-timeout", type=float)
    args = parser.parse_args()
    if args.flush_timeout is not None:
        LoggingCallback.flush_timeout = args.flush_timeout

    callbacks = [
        ModelCheckpoint(os.path.join(args.out, "ckpts"), every_n_train_steps=1, every_n_epochs=None)
    ]
    if args.announce_step is not None:
        callbacks.append(Announce(args.announce_step))
    loggers = make_loggers(args.out)
    if args.hung:
        loggers.insert(0, HungLogger())
    trainer = solstice.Trainer(
        **trainer_kwargs(args.max_epochs), callbacks=callbacks, loggers=loggers
    )
    trainer.fit(make_experiment(), blobs_datamodule(), ckpt_path="last" if args.resume else None)
    trainer.close()
    with open(os.path.join(args.out, "history.json"), "w") as f:
        json.dump(history_lists(trainer.history), f)
    print("DONE", flush=True)


if __name__ == "__main__":
    main()
