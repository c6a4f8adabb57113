"""A small training run, started as a subprocess by the kill/resume and signal tests.

    python tests/resume_worker.py CKPT_DIR [--resume] [--max-epochs N] [--every N]
                                  [--announce-step N] [--csv DIR] [--out DIR]

Checkpoints go to CKPT_DIR (every `--every` steps, keeping the most recent). `--resume`
continues from the newest valid one (`ckpt_path="last"`). At `--announce-step` the run prints
`STEP <n>` so a test can signal it mid-training. `--out` saves the final experiment with
`solstice.save`.
"""

import argparse
import os
import signal
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from helpers import blobs_datamodule, make_mlp_experiment  # noqa: E402

import solstice  # noqa: E402
from solstice.callbacks import Callback, ModelCheckpoint  # noqa: E402


def make_experiment():
    return make_mlp_experiment(seed=0, in_size=8, num_classes=4)


def trainer_kwargs(max_epochs: int) -> dict:
    return dict(max_epochs=max_epochs, log_every_n_steps=3, devices=1, enable_progress_bar=False)


class Announce(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, experiment, batch, batch_idx):
        if trainer.global_step == self.step:
            print(f"STEP {self.step}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("ckpt_dir")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--max-epochs", type=int, default=6)
    parser.add_argument("--every", type=int, default=1)
    parser.add_argument("--announce-step", type=int)
    parser.add_argument("--csv")
    parser.add_argument("--out")
    args = parser.parse_args()

    callbacks = [
        ModelCheckpoint(args.ckpt_dir, every_n_train_steps=args.every or None, every_n_epochs=None)
    ]
    if args.announce_step is not None:
        callbacks.append(Announce(args.announce_step))
    loggers = [solstice.CSVLogger(args.csv)] if args.csv else []
    trainer = solstice.Trainer(
        **trainer_kwargs(args.max_epochs), callbacks=callbacks, loggers=loggers
    )
    try:
        experiment = trainer.fit(
            make_experiment(), blobs_datamodule(), ckpt_path="last" if args.resume else None
        )
    except KeyboardInterrupt:
        restored = signal.getsignal(signal.SIGINT) is signal.default_int_handler
        print(f"KEYBOARDINTERRUPT handlers-restored={restored}", flush=True)
        raise
    if args.out:
        solstice.save(args.out, experiment)
    print("DONE", flush=True)


if __name__ == "__main__":
    main()
